"""Teacher encoding throughput: naive fp32 vs the project's default encoder vs each option tried.

One command measures, in one process and interleaved round by round (so that load from other
jobs on a shared machine hits every method alike), on synthetic short item / user texts
("Toy Story (1995). Genres: Animation, Children's, Comedy.", "A 24-year-old female student
from zip code 85711. Likes Comedy and Drama movies."):

* ``naive_fp32``         plain transformers: ``AutoModel`` fp32 (SDPA), texts in input order,
                         batch 128 padded to the longest in the batch, mean pooling. The
                         reference for the cosines and the speed-ups;
* ``default``            :class:`sparse_kd.teacher.encoder.TextEncoder` with its defaults
                         (length-sorted batches, ``precision=auto``: bf16 where native);
* ``fp32_sorted``        length sorting alone; ``fp32_sorted_eager``: eager attention;
* ``fp32_matmul_medium`` ``torch.set_float32_matmul_precision("medium")`` (oneDNN bf16 matmuls);
* ``bf16_autocast``      fp32 weights under ``torch.autocast("cpu", bfloat16)``;
* ``bf16_unsorted``      bf16 weights without length sorting; ``bf16_eager``: eager attention;
* ``bf16_bs64`` / ``bf16_bs256``  other batch sizes;
* ``int8_all`` / ``int8_attn`` / ``int8_no_ffn_out``  ``torch.ao.quantization.quantize_dynamic``
                         on every Linear / only the attention projections (Q, K, V, output) /
                         every Linear except the FFN output projection (kept fp32);
* ``fp32_1thread`` / ``bf16_1thread``  one intra-op thread instead of torch's default;
* ``bf16_compile``       ``torch.compile(dynamic=True)`` on the bf16 model (full run only; its
                         compile time is reported apart, not in texts/s).
* ``shrunk2_bf16`` / ``shrunk3_bf16``  a 2- / 3-layer teacher made by
                         :func:`sparse_kd.teacher.shrink.shrink_teacher` (``sparse-kd teacher-shrink``):
                         layers of MiniLM kept and tuned to its fp32 embeddings of 4000 texts from
                         this generator with another seed (texts that the measured set contains are
                         dropped, so the measured texts are held out), loaded as a folder by
                         ``TextEncoder`` in bf16. Built once into ``--shrunk-dir`` and reused while its
                         ``shrink.json`` matches the recipe (``SHRINK_RECIPES``: ``full``, 8 epochs,
                         about 10 minutes once on 1 thread; ``quick``, 300 texts x 2 epochs, seconds,
                         lower cosine; the default is ``quick`` with ``--quick``, else ``full``); the
                         tuning's own held-out cosine and time go to ``extra``. ``--no-shrunk`` skips them.

Reported per method: texts/s (median over rounds), speed-up vs ``naive_fp32`` (ratio of the
medians), mean and min cosine of its embeddings to the naive fp32 ones, and the best round's
texts/s (load from other jobs only ever adds time). Methods run in a shuffled order each round.

    python benchmarks/bench_teacher.py                 # 1024 texts, 3 rounds (a few minutes)
    python benchmarks/bench_teacher.py --quick         # 128 texts, fewer methods (seconds)
    python benchmarks/bench_teacher.py --out runs/bench/teacher.json --reps 5
    python benchmarks/bench_teacher.py --quick --shrink-recipe full   # quick timing, the real shrunk models
    python benchmarks/bench_teacher.py --shrink-threads 0   # tune the shrunk models on every thread (idle machine)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from sparse_kd.teacher.encoder import TextEncoder, mean_pool, native_bf16  # noqa: E402
from sparse_kd.teacher.shrink import PROVENANCE_FILE, shrink_teacher  # noqa: E402

from machine import machine_info as _machine_info, write_json  # noqa: E402


def machine_info() -> dict[str, Any]:
    return _machine_info({"native_bf16_cpu": native_bf16(torch.device("cpu"))})

# ------------------------------------------------------------------------------------ texts

GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
WORDS_A = ["Toy", "Golden", "Dark", "Last", "Little", "Lost", "Silent", "Broken", "Secret", "Wild", "Crimson",
           "Midnight", "Hidden", "Brave", "Frozen", "Electric"]
WORDS_B = ["Story", "Eye", "City", "Road", "River", "Heart", "Kingdom", "Dream", "Island", "Garden", "Storm",
           "Mirror", "Night", "Empire", "Summer", "Game"]
OCCUPATIONS = ["programmer", "student", "educator", "engineer", "artist", "librarian", "writer", "executive",
               "administrator", "scientist", "technician", "healthcare worker", "lawyer", "retired person",
               "salesman", "homemaker"]


def make_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` synthetic short texts, alternating MovieLens-style item and user descriptions (12-42 tokens)."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2 == 0:
            title = f"{r.choice(WORDS_A)} {r.choice(WORDS_B)}" + (f" {r.randint(2, 4)}" if r.random() < 0.15 else "")
            if r.random() < 0.2:
                title = f"The {title}, Part {r.choice(['I', 'II', 'III'])}: {r.choice(WORDS_A)} {r.choice(WORDS_B)}"
            genres = r.sample(GENRES, r.randint(1, 4))
            out.append(f"{title} ({r.randint(1930, 1998)}). Genres: {', '.join(genres)}.")
        else:
            s = (f"A {r.randint(14, 70)}-year-old {r.choice(['male', 'female'])} {r.choice(OCCUPATIONS)} "
                 f"from zip code {r.randint(10000, 99999)}.")
            likes = r.sample(GENRES, r.randint(1, 5))
            if r.random() < 0.7:
                liked = likes[0] if len(likes) == 1 else ", ".join(likes[:-1]) + " and " + likes[-1]
                s += f" Likes {liked} movies."
            if r.random() < 0.3:
                s += (f" Recently watched {r.choice(WORDS_A)} {r.choice(WORDS_B)} and "
                      f"{r.choice(WORDS_A)} {r.choice(WORDS_B)}.")
            out.append(s)
    return out


# ------------------------------------------------------------------------------------ methods

# How the shrunk teachers are made: tuned on texts of make_texts(tune_texts, tune_seed) minus those of
# make_texts(exclude_first, 0) (a superset of the measured texts, which are a prefix of that sequence).
SHRINK_RECIPES: dict[str, dict[str, Any]] = {
    "full": {"tune_texts": 4000, "tune_seed": 1, "exclude_first": 4096, "epochs": 8, "lr": 1e-3,
             "batch_size": 32, "seed": 0, "held_out_fraction": 0.1, "max_length": 64, "token_loss": 1.0},
    "quick": {"tune_texts": 300, "tune_seed": 1, "exclude_first": 4096, "epochs": 2, "lr": 1e-3,
              "batch_size": 32, "seed": 0, "held_out_fraction": 0.1, "max_length": 64, "token_loss": 1.0},
}
SHRUNK_LAYERS = (2, 3)


def shrunk_teacher(layers: int, root: Path, n_texts: int, threads: int,
                   recipe_name: str = "full") -> tuple[Path, dict[str, Any]]:
    """The folder of the ``layers``-layer shrunk teacher (made, or reused when its recipe matches) and its report."""
    from sparse_kd.config import TeacherConfig

    base = SHRINK_RECIPES[recipe_name]
    recipe = {**base, "layers": layers, "exclude_first": max(base["exclude_first"], n_texts)}
    folder = root / (f"L{layers}" if recipe_name == "full" else f"L{layers}-{recipe_name}")
    source_fp = TextEncoder("default", show_progress=False).fingerprint
    prov_file = folder / PROVENANCE_FILE
    if prov_file.is_file():
        prov = json.loads(prov_file.read_text(encoding="utf-8"))
        if prov.get("data", {}).get("info") == {"bench_recipe": recipe} and prov["source"]["fingerprint"] == source_fp:
            held = prov["held_out"]
            return folder, {"recipe": recipe_name, "reused": True, "held_out_mean_cos": held["mean_cos"], "held_out_min_cos": held["min_cos"],
                            "untuned_held_out_mean_cos": held["untuned_mean_cos"], "seconds": prov["seconds"],
                            "train_texts": prov["data"]["train_texts"], "kept_layers": prov["kept_layers"]}
    measured = set(make_texts(recipe["exclude_first"], seed=0))
    tune = [t for t in make_texts(recipe["tune_texts"], seed=recipe["tune_seed"]) if t not in measured]
    print(f"shrinking the teacher to {layers} layers on {len(tune)} texts (once; reused from {folder})", flush=True)
    cfg = TeacherConfig(max_length=recipe["max_length"], cache_dir=str(root / "cache"))
    rep = shrink_teacher(cfg, tune, layers, folder, epochs=recipe["epochs"], lr=recipe["lr"],
                         batch_size=recipe["batch_size"], seed=recipe["seed"],
                         held_out_fraction=recipe["held_out_fraction"], token_loss=recipe["token_loss"],
                         data_info={"bench_recipe": recipe},
                         num_threads=threads, show_progress=False)
    return folder, {"recipe": recipe_name, "reused": False, **{k: rep[k] for k in ("held_out_mean_cos", "held_out_min_cos",
                                                             "untuned_held_out_mean_cos", "seconds", "train_texts",
                                                             "kept_layers")}}



class NaiveEncoder:
    """Plain transformers: fp32, input order, batch padded to its longest text, mean pooling."""

    def __init__(self, path: Path, batch_size: int, max_length: int) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).eval()
        self.batch_size, self.max_length = batch_size, max_length

    def encode(self, texts: list[str]) -> torch.Tensor:
        outs = []
        with torch.inference_mode():
            for s in range(0, len(texts), self.batch_size):
                enc = self.tok(texts[s:s + self.batch_size], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state  # (B, T, H)
                outs.append(F.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1))
        return torch.cat(outs)


class Autocast(nn.Module):
    """Runs ``inner`` under ``torch.autocast(device, bfloat16)``."""

    def __init__(self, inner: nn.Module, device: str = "cpu") -> None:
        super().__init__()
        self.inner, self.config, self.device_type = inner, inner.config, device

    def forward(self, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.inner(**kwargs)


def quantize_int8(model: nn.Module, keep: Callable[[str], bool]) -> nn.Module:
    """Dynamic int8 on the Linear layers whose name ``keep(name)`` accepts; the rest stay fp32."""
    import warnings

    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and keep(n) and "pooler" not in n}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), names, dtype=torch.qint8)


@contextlib.contextmanager
def matmul_precision(p: str):
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(p)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def build_methods(quick: bool, batch_size: int, max_length: int,
                  shrunk: dict[int, Path] | None = None) -> dict[str, tuple[Any, Callable[[], Any]]]:
    """name -> (encoder with .encode, context factory to run it in); ``shrunk``: layers -> shrunk teacher folder."""
    none = contextlib.nullcontext
    kw = dict(batch_size=batch_size, max_length=max_length, show_progress=False, device="cpu")

    def enc(**over: Any) -> TextEncoder:
        e = TextEncoder(over.pop("model", "default"), **{**kw, **over})
        e.load()
        return e

    default = enc()
    methods: dict[str, tuple[Any, Callable[[], Any]]] = {
        "naive_fp32": (NaiveEncoder(default.path, batch_size, max_length), none),
        "default": (default, none),
        "fp32_sorted": (enc(precision="fp32"), none),
        "bf16_unsorted": (enc(precision="bf16", sort_by_length=False), none),
    }
    fp32 = methods["fp32_sorted"][0]

    def int8(keep: Callable[[str], bool]) -> TextEncoder:
        e = enc(precision="fp32")
        e.model = quantize_int8(fp32.model, keep)
        return e

    methods["int8_all"] = (int8(lambda n: True), none)
    methods["int8_attn"] = (int8(lambda n: ".attention." in n), none)
    methods["bf16_1thread"] = (enc(precision="bf16", num_threads=1), none)
    for k, folder in (shrunk or {}).items():
        methods[f"shrunk{k}_bf16"] = (enc(model=str(folder), precision="bf16"), none)
    if quick:
        return methods
    auto = enc(precision="fp32")
    auto.model = Autocast(auto.model)
    methods.update({
        "fp32_sorted_eager": (enc(precision="fp32", attn_implementation="eager"), none),
        "fp32_matmul_medium": (enc(precision="fp32"), lambda: matmul_precision("medium")),
        "bf16_autocast": (auto, none),
        "bf16_eager": (enc(precision="bf16", attn_implementation="eager"), none),
        "bf16_bs64": (enc(precision="bf16", batch_size=64), none),
        "bf16_bs256": (enc(precision="bf16", batch_size=256), none),
        "int8_no_ffn_out": (int8(lambda n: not (n.endswith("output.dense") and ".attention." not in n)), none),
        "fp32_1thread": (enc(precision="fp32", num_threads=1), none),
    })
    return methods


# ------------------------------------------------------------------------------------ machine



# ------------------------------------------------------------------------------------ main


def run(quick: bool, reps: int, n_texts: int, batch_size: int, max_length: int, compile_: bool,
        shrunk_dir: Path | None = None, shrink_threads: int = 0, shrink_recipe: str = "full") -> dict[str, Any]:
    texts = make_texts(n_texts)
    info = machine_info()
    extra: dict[str, Any] = {}
    shrunk: dict[int, Path] = {}
    if shrunk_dir is not None:
        if max_length != SHRINK_RECIPES[shrink_recipe]["max_length"]:
            raise SystemExit(f"--max-length {max_length}: the shrunk teachers are tuned at "
                             f"{SHRINK_RECIPES[shrink_recipe]['max_length']}; pass --no-shrunk")
        for k in SHRUNK_LAYERS:
            shrunk[k], extra[f"shrunk{k}_tuning"] = shrunk_teacher(k, shrunk_dir, n_texts, shrink_threads, shrink_recipe)
    t0 = time.perf_counter()
    methods = build_methods(quick, batch_size, max_length, shrunk)
    print(f"{len(texts)} texts, batch {batch_size}, max_length {max_length}, {reps} rounds, "
          f"{torch.get_num_threads()} threads, {len(methods)} methods (built in {time.perf_counter() - t0:.1f}s)",
          flush=True)
    if compile_:
        e = TextEncoder("default", precision="bf16", batch_size=batch_size, max_length=max_length,
                        show_progress=False, device="cpu")
        e.model = torch.compile(e.model, dynamic=True)
        t = time.perf_counter()
        e.encode(texts)  # compiles (and recompiles for the shapes it meets)
        extra["bf16_compile_first_call_s"] = round(time.perf_counter() - t, 2)
        print(f"bf16_compile: first call (compilation) {extra['bf16_compile_first_call_s']}s", flush=True)
        methods["bf16_compile"] = (e, contextlib.nullcontext)

    for enc, ctx in methods.values():  # warm-up: oneDNN primitives, allocator
        with ctx():
            enc.encode(texts[:batch_size])
    times: dict[str, list[float]] = {m: [] for m in methods}
    embs: dict[str, torch.Tensor] = {}
    for r in range(reps):
        order = list(methods)
        random.Random(r).shuffle(order)  # no method always runs right after the same neighbour
        for name in order:
            enc, ctx = methods[name]
            with ctx():
                t = time.perf_counter()
                embs[name] = enc.encode(texts)
                times[name].append(time.perf_counter() - t)
        print(f"round {r + 1}/{reps} done", flush=True)

    ref = embs["naive_fp32"]
    naive_tps = len(texts) / statistics.median(times["naive_fp32"])
    rows = []
    for name in methods:
        cos = F.cosine_similarity(embs[name], ref, dim=1)
        tps = len(texts) / statistics.median(times[name])
        best = len(texts) / min(times[name])
        rows.append({"method": name, "texts_per_s": round(tps, 1), "speedup": round(tps / naive_tps, 2),
                     "best_texts_per_s": round(best, 1),
                     "mean_cos": round(cos.mean().item(), 5), "min_cos": round(cos.min().item(), 5),
                     "seconds": [round(t, 3) for t in times[name]]})
    tok = methods["default"][0].tokenizer
    t = time.perf_counter()
    tok(texts, truncation=True, max_length=max_length)
    extra["tokenize_all_s"] = round(time.perf_counter() - t, 4)
    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    default = methods["default"][0]
    return {"benchmark": "teacher", "quick": quick, "num_texts": len(texts), "reps": reps, "batch_size": batch_size,
            "max_length": max_length, "model": "all-MiniLM-L6-v2 (default)", "default_precision": default.precision,
            "machine": info, "results": rows, "extra": extra,
            "median_tokens": statistics.median(len(x) for x in tok(texts)["input_ids"])}


def print_table(res: dict[str, Any]) -> None:
    print(f"\n{'method':<20} {'texts/s':>9} {'speed-up':>9} {'mean cos':>9} {'min cos':>9} {'best t/s':>9}")
    for r in res["results"]:
        print(f"{r['method']:<20} {r['texts_per_s']:>9.1f} {r['speedup']:>8.2f}x {r['mean_cos']:>9.5f} "
              f"{r['min_cos']:>9.5f} {r['best_texts_per_s']:>9.1f}")
    m = res["machine"]
    print(f"\n{res['num_texts']} texts (median {res['median_tokens']} tokens), median of {res['reps']} rounds; "
          f"default precision: {res['default_precision']}; {m.get('cpu_model')}, {m['usable_cpus']} cores, "
          f"torch {m['torch']}, transformers {m['transformers']}; load avg {m.get('loadavg_start')} -> {m.get('loadavg_end')}")
    for k, v in res["extra"].items():
        print(f"{k}: {v}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 texts, 3 rounds, fewer methods, no torch.compile")
    ap.add_argument("--reps", type=int, default=None, help="rounds (median reported; default 3)")
    ap.add_argument("--texts", type=int, default=None, help="number of texts (default 1024, quick 128)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile in the full run")
    ap.add_argument("--out", default="runs/bench/teacher.json", help="JSON results path")
    ap.add_argument("--shrunk-dir", default="runs/bench/shrunk_teacher",
                    help="where the shrunk teachers are made once and reused (default %(default)s)")
    ap.add_argument("--shrink-threads", type=int, default=1,
                    help="torch threads while tuning the shrunk teachers (default %(default)s: several times faster "
                         "than 2 on a busy machine; 0: torch's default). Tuning time is not what is measured")
    ap.add_argument("--shrink-recipe", choices=sorted(SHRINK_RECIPES), default=None,
                    help="how the shrunk teachers are tuned: full (8 epochs on 4000 texts, minutes once) or quick "
                         "(seconds, lower cosine); default quick with --quick, else full")
    ap.add_argument("--no-shrunk", action="store_true", help="skip the shrunk2_bf16 / shrunk3_bf16 methods")
    a = ap.parse_args(argv)
    reps = a.reps or 3
    if reps < 1:
        ap.error("--reps must be >= 1")
    res = run(a.quick, reps, a.texts or (128 if a.quick else 1024), a.batch_size, a.max_length,
              compile_=not (a.quick or a.no_compile), shrunk_dir=None if a.no_shrunk else Path(a.shrunk_dir),
              shrink_threads=a.shrink_threads, shrink_recipe=a.shrink_recipe or ("quick" if a.quick else "full"))
    res["command"] = " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else argv))
    print_table(res)
    write_json(a.out, res, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
