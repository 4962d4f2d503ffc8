"""Synthetic text-rich dataset (the demo default): text meaning drives the clicks, IDs do not reveal it.

World (deterministic given ``SyntheticConfig.seed``; sizes from :class:`SyntheticConfig`):
    * ``num_topics`` real topics (at most 12: space, cooking, football, jazz, gardening, history,
      horror films, romance novels, hiking, personal finance, photography, programming).
    * Item i has a hidden topic (visible only in its English text, e.g. "A beginner's course on
      sourdough bread and home baking."), a hidden quality ~ N(0, 1) and a Zipf popularity.
      Its categorical features ``format`` (book/film/podcast/course) and ``price_tier``
      (budget/standard/premium) are drawn independently of the topic.
    * User u has 1-2 hidden interest topics stated in its text with varied wording plus an age
      ("A 34-year-old who hikes mountain trails every weekend and grows tomatoes in the garden.");
      categorical features ``age_bucket`` and ``region`` are independent of the interests.
    * Each user sees ``interactions_per_user`` distinct items drawn with probability proportional
      to popularity x (2 if the item's topic is one of the user's interests else 1), and clicks with
      p = sigmoid(A * match + B * quality - C); labels are then flipped with prob. ``label_noise``.
      With the defaults ~37% of interactions are clicks: ~76% on items of the user's topics vs ~21%
      on the others, ~28% of interactions being such matches (``report["click_rate"]``).
    * Timestamps: each interaction gets a uniform time in a 180-day window; the global time order
      drives the split (:mod:`sparse_kd.data.split`: cold items, then temporal 80/10/10).

Feature order: user_id, item_id, age_bucket, region (user), format, price_tier (item).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparse_kd.config import DataConfig, SyntheticConfig
from sparse_kd.data.schema import DataError, RecDataset
from sparse_kd.data.split import id_feature, make_feature, split_interactions, truncate_text

A_MATCH, B_QUALITY, C_BIAS = 4.0, 1.0, 2.0
EXPOSURE_BOOST = 2.0
ZIPF_EXPONENT = 0.8
T0, WINDOW_S = 1_600_000_000, 180 * 86_400
# Above this many user x item weights, items are drawn per interest set (_sample_by_interest):
# the same distribution in O(U K log I) instead of O(U I), another random stream. Every world
# the tests, the demo and the documented studies use is below it, so their data is unchanged.
EXACT_SAMPLING_LIMIT = 5_000_000_000

# topic -> (item subjects, user interest phrases as verb phrases after "who")
TOPICS: dict[str, tuple[list[str], list[str]]] = {
    "space": (
        ["the Apollo moon landings", "life aboard the International Space Station", "rockets and orbital mechanics",
         "the search for planets around distant stars", "Mars rovers and what they found", "black holes and galaxies",
         "how astronauts train for long missions", "mapping the night sky with telescopes"],
        ["follows every rocket launch", "spends clear nights stargazing through a telescope",
         "reads everything about astronomy and the planets", "dreams of a trip to Mars", "is fascinated by astronauts and NASA missions"],
    ),
    "cooking": (
        ["sourdough bread and home baking", "quick weeknight pasta dinners", "the secrets of French sauces",
         "spicy street food from Thailand", "knife skills for the home cook", "slow-cooked stews and soups",
         "baking cakes and pastries from scratch", "seasonal vegetarian recipes"],
        ["loves trying new recipes in the kitchen", "bakes bread every Sunday", "hosts dinner parties for friends",
         "collects cookbooks from around the world", "experiments with spices and sauces"],
    ),
    "football": (
        ["the greatest World Cup finals", "tactics of modern football managers", "the rise of a young striker",
         "life inside a Premier League club", "famous goalkeepers and penalty shootouts", "building a winning football team",
         "the history of the Champions League", "training drills for amateur footballers"],
        ["never misses a football match on weekends", "plays five-a-side soccer with friends",
         "supports the local football club", "follows the transfer market closely", "coaches a youth soccer team"],
    ),
    "jazz": (
        ["the birth of bebop in New York clubs", "Miles Davis and the cool jazz era", "learning jazz piano improvisation",
         "legendary saxophone players", "big band swing of the 1930s", "the great jazz singers",
         "how to listen to a jazz solo", "New Orleans brass bands"],
        ["listens to jazz records every evening", "plays the saxophone in a small band",
         "goes to live jazz clubs", "collects vinyl of Coltrane and Monk", "is learning to improvise on the piano"],
    ),
    "gardening": (
        ["growing tomatoes on a small balcony", "planning a flower border for every season", "composting and healthy soil",
         "pruning roses and fruit trees", "starting a vegetable patch", "indoor plants that are hard to kill",
         "attracting bees and butterflies to the garden", "saving seeds from heirloom vegetables"],
        ["spends weekends gardening", "grows vegetables in the back yard", "takes care of dozens of houseplants",
         "loves planting flowers", "keeps a compost heap and an allotment"],
    ),
    "history": (
        ["the fall of the Roman Empire", "daily life in medieval castles", "the causes of the First World War",
         "ancient Egypt and the pyramids", "the voyages of early explorers", "revolutions that shaped Europe",
         "the Silk Road trade routes", "empires of the ancient world"],
        ["reads history books about ancient empires", "visits museums and old battlefields",
         "is fascinated by the Middle Ages", "loves learning about the Romans and the Greeks", "studies the world wars"],
    ),
    "horror": (
        ["a haunted house that never lets go", "zombie outbreaks and survival", "classic vampire tales",
         "a masked killer stalking a small town", "the scariest ghost stories ever filmed", "monsters lurking in the dark",
         "possession and exorcism", "a cursed video tape"],
        ["watches scary movies late at night", "loves horror films and ghost stories", "never misses a new slasher film",
         "enjoys being frightened by monsters and zombies", "collects classic vampire movies"],
    ),
    "romance": (
        ["two strangers falling in love in Paris", "a summer romance by the sea", "second chances at first love",
         "a wedding that changes everything", "love letters across the ocean", "a heartwarming love story",
         "enemies who become lovers", "a royal romance"],
        ["reads romance novels", "loves heartwarming love stories", "cries at every romantic ending",
         "enjoys stories about falling in love", "devours romantic fiction on holidays"],
    ),
    "hiking": (
        ["long-distance trails through the Alps", "packing light for a mountain trek", "summiting your first peak",
         "wild camping under the stars", "the best national park hikes", "navigation with map and compass",
         "staying safe on high mountain passes", "walking coast-to-coast paths"],
        ["hikes mountain trails every weekend", "goes backpacking in national parks", "loves climbing peaks",
         "spends holidays trekking in the mountains", "goes camping and hillwalking"],
    ),
    "finance": (
        ["building an emergency fund", "investing in index funds for beginners", "paying off debt faster",
         "planning an early retirement", "making a household budget that works", "understanding the stock market",
         "saving for a first home", "taxes explained simply"],
        ["manages a careful monthly budget", "invests in stocks and index funds", "is saving for an early retirement",
         "reads about personal finance", "tracks every expense to save money"],
    ),
    "photography": (
        ["portraits in natural light", "mastering your camera's manual mode", "landscape photography at golden hour",
         "street photography in big cities", "editing photos like a pro", "wildlife photography on safari",
         "black and white film cameras", "composition rules for better pictures"],
        ["takes photos everywhere with a camera", "loves landscape photography", "edits pictures late into the night",
         "shoots street photography in the city", "collects vintage film cameras"],
    ),
    "programming": (
        ["writing your first Python program", "how computers run code", "building a website from scratch",
         "algorithms and data structures", "debugging like a software engineer", "machine learning for beginners",
         "open source software communities", "designing clean software"],
        ["writes code as a hobby", "builds apps and websites", "loves solving programming puzzles",
         "contributes to open source projects", "is learning Python and machine learning"],
    ),
}
TOPIC_NAMES = tuple(TOPICS)
FORMATS = ("book", "film", "podcast", "course")
PRICE_TIERS = ("budget", "standard", "premium")
REGIONS = ("north", "south", "east", "west", "central")
_ITEM_TEMPLATES = (
    "A beginner's {fmt} on {s}.", "An in-depth {fmt} about {s}.", "A short {fmt} exploring {s}.",
    "Everything you wanted to know about {s}, in one {fmt}.", "A {fmt} on {s} for curious minds.",
    "An award-winning {fmt} about {s}.", "A light-hearted {fmt} on {s}.", "A {fmt} taking a fresh look at {s}.",
)
_USER_ONE = ("A {age}-year-old who {p}.", "At {age}, this person {p}.", "Someone aged {age} who {p}.")
_USER_TWO = ("A {age}-year-old who {p} and {q}.", "At {age}, this person {p}, and also {q}.",
             "Someone aged {age} who {p}, and who also {q}.")


@dataclass
class SyntheticWorld:
    """The hidden truth behind the synthetic data (for tests and analysis, never for the models).

    item_topic: (I,) int64; item_quality: (I,) float64; user_interest: (U, T) bool.
    """

    item_topic: np.ndarray
    item_quality: np.ndarray
    user_interest: np.ndarray


def _age_bucket(age: int) -> str:
    return "18-24" if age < 25 else "25-34" if age < 35 else "35-44" if age < 45 else "45-54" if age < 55 else "55+"


def _sample_by_interest(rng: np.random.Generator, interest: np.ndarray, item_topic: np.ndarray,
                        popularity: np.ndarray, K: int) -> np.ndarray:
    """K distinct items per user, each drawn with probability ~ popularity x (EXPOSURE_BOOST if
    the item's topic is one of the user's), without replacement (successive draws, duplicates
    redrawn), for large worlds: users that share an interest set share one CDF. Rows in user order."""
    U = interest.shape[0]
    out = np.empty((U, K), dtype=np.int64)
    keys = np.packbits(interest, axis=1, bitorder="little")
    keys = keys.astype(np.int64) @ (256 ** np.arange(keys.shape[1], dtype=np.int64))
    for key in np.unique(keys):
        members = np.flatnonzero(keys == key)
        w = popularity * np.where(interest[members[0], item_topic], EXPOSURE_BOOST, 1.0)
        cdf = np.cumsum(w)
        cdf /= cdf[-1]
        todo = np.arange(len(members))
        drawn = np.empty((len(members), K), dtype=np.int64)
        filled = np.zeros(len(members), dtype=np.int64)
        while len(todo):  # each pass draws one item for every user still short, redrawing duplicates
            pick = np.minimum(np.searchsorted(cdf, rng.random(len(todo)), side="right"), len(cdf) - 1)
            dup = (drawn[todo, :] == pick[:, None]) & (np.arange(K)[None, :] < filled[todo, None])
            ok = ~dup.any(axis=1)
            drawn[todo[ok], filled[todo[ok]]] = pick[ok]
            filled[todo[ok]] += 1
            todo = todo[filled[todo] < K]
        out[members] = drawn
    return out.reshape(-1)


def load_synthetic(cfg: DataConfig) -> RecDataset:
    """Generate the dataset for ``cfg.synthetic`` and split it with ``cfg`` (cold items + temporal)."""
    return generate(cfg)[0]


def generate(cfg: DataConfig) -> tuple[RecDataset, SyntheticWorld]:
    """The dataset plus its hidden :class:`SyntheticWorld`."""
    syn: SyntheticConfig = cfg.synthetic
    if not 2 <= syn.num_topics <= len(TOPICS):
        raise DataError(f"data.synthetic.num_topics={syn.num_topics}: the generator has {len(TOPICS)} built-in topics. "
                        f"Fix: set it between 2 and {len(TOPICS)}.")
    if syn.interactions_per_user > syn.num_items:
        raise DataError(f"data.synthetic.interactions_per_user={syn.interactions_per_user} exceeds num_items="
                        f"{syn.num_items}. Fix: lower it or raise num_items (each user sees distinct items).")
    rng = np.random.default_rng(syn.seed)
    U, I, T, K = syn.num_users, syn.num_items, syn.num_topics, syn.interactions_per_user
    report: dict = {"source": "synthetic", "rows_read": {}, "dropped": {}, "truncated_texts": 0}

    # items
    item_topic = rng.integers(0, T, size=I)
    quality = rng.standard_normal(I)
    popularity = 1.0 / np.arange(1, I + 1) ** ZIPF_EXPONENT
    popularity = popularity[rng.permutation(I)]
    fmt = rng.integers(0, len(FORMATS), size=I)
    tier = rng.integers(0, len(PRICE_TIERS), size=I)
    item_text = []
    for i in range(I):
        subjects = TOPICS[TOPIC_NAMES[item_topic[i]]][0]
        s = subjects[rng.integers(len(subjects))]
        tpl = _ITEM_TEMPLATES[rng.integers(len(_ITEM_TEMPLATES))]
        item_text.append(truncate_text(tpl.format(fmt=FORMATS[fmt[i]], s=s), cfg.max_text_chars, report))

    # users
    interest = np.zeros((U, T), dtype=bool)
    ages = rng.integers(18, 71, size=U)
    region = rng.integers(0, len(REGIONS), size=U)
    user_text = []
    for u in range(U):
        n_int = 1 + int(rng.random() < 0.5)
        topics = rng.choice(T, size=n_int, replace=False)
        interest[u, topics] = True
        phrases = [TOPICS[TOPIC_NAMES[t]][1][rng.integers(len(TOPICS[TOPIC_NAMES[t]][1]))] for t in topics]
        if n_int == 1:
            tpl = _USER_ONE[rng.integers(len(_USER_ONE))]
            text = tpl.format(age=ages[u], p=phrases[0])
        else:
            tpl = _USER_TWO[rng.integers(len(_USER_TWO))]
            text = tpl.format(age=ages[u], p=phrases[0], q=phrases[1])
        user_text.append(truncate_text(text, cfg.max_text_chars, report))

    # interactions
    users = np.repeat(np.arange(U, dtype=np.int64), K)
    if U * I <= EXACT_SAMPLING_LIMIT:
        items = np.empty(U * K, dtype=np.int64)
        for u in range(U):
            w = popularity * np.where(interest[u, item_topic], EXPOSURE_BOOST, 1.0)
            items[u * K : (u + 1) * K] = rng.choice(I, size=K, replace=False, p=w / w.sum())
    else:
        items = _sample_by_interest(rng, interest, item_topic, popularity, K)
    match = interest[users, item_topic[items]]
    p_click = 1.0 / (1.0 + np.exp(-(A_MATCH * match + B_QUALITY * quality[items] - C_BIAS)))
    clean = rng.random(U * K) < p_click
    flip = rng.random(U * K) < syn.label_noise
    labels = (clean ^ flip).astype(np.float32)
    stamps = T0 + rng.integers(0, WINDOW_S, size=U * K)
    order = np.argsort(stamps, kind="stable")
    users, items, labels, stamps, match = users[order], items[order], labels[order], stamps[order], match[order]

    report["rows_read"]["generated_interactions"] = int(U * K)
    report["click_rate"] = {
        "overall": round(float(labels.mean()), 4),
        "topic_match": round(float(labels[match].mean()), 4) if match.any() else 0.0,
        "no_match": round(float(labels[~match].mean()), 4) if (~match).any() else 0.0,
        "match_fraction": round(float(match.mean()), 4),
    }
    splits, split_report = split_interactions(users, items, labels, stamps, I, cfg)
    report["split"] = split_report
    user_ids = [f"u{u:05d}" for u in range(U)]
    item_ids = [f"i{i:05d}" for i in range(I)]
    features = [
        id_feature("user_id", "user", user_ids),
        id_feature("item_id", "item", item_ids),
        make_feature("age_bucket", "user", [[_age_bucket(int(a))] for a in ages]),
        make_feature("region", "user", [[REGIONS[r]] for r in region]),
        make_feature("format", "item", [[FORMATS[f]] for f in fmt]),
        make_feature("price_tier", "item", [[PRICE_TIERS[t]] for t in tier]),
    ]
    ds = RecDataset(user_ids, item_ids, user_text, item_text, features, splits, report)
    return ds, SyntheticWorld(item_topic.astype(np.int64), quality, interest)
