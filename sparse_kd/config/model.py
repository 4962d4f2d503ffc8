"""Sections for the rankers and their training: ``student`` (with its sharding ``planner``), ``distill`` and ``train``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

@dataclass(frozen=True)
class PlannerConfig:
    """Memory the sharding planner may use per rank on CUDA (CPU plans are built by hand).

    0 means: from the machine (GPU memory of the device; host RAM divided by the local processes).
    Tables that do not fit in ``hbm_cap_gb`` get UVM-caching kernels (rows in host memory,
    a cache on the GPU) instead of an out-of-memory at start-up.
    """

    hbm_cap_gb: float = 0.0
    ddr_cap_gb: float = 0.0


@dataclass(frozen=True)
class StudentConfig:
    """The DLRM student (and the teacher ranker, which shares its architecture).

    sharding: per-feature sharding type; features not named use ``default_sharding``.
    planner: memory caps for torchrec's planner on CUDA (does not change what training computes).
    """

    embedding_dim: int = 16
    dense_arch: tuple[int, ...] = (32, 16)
    over_arch: tuple[int, ...] = (64, 32, 1)
    default_sharding: Literal["table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"] = "table_wise"
    sharding: dict[str, str] = field(default_factory=dict)
    teacher_text_dim: int = 64  # teacher ranker: text embeddings are PCA-reduced to this many dims
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    # add the user_id . item_id dot product to the logit, as matrix factorisation does (the DLRM
    # only feeds it to the over MLP); no new parameters, served as is (sparse_kd.student.model.DotOverArch).
    # The student and the baseline only: the teacher ranker keeps its own architecture
    dot_logit: bool = False


@dataclass(frozen=True)
class LogitKDConfig:
    enabled: bool = False
    kd_ratio: float = 0.5
    temperature: float = 2.0


@dataclass(frozen=True)
class AlignConfig:
    enabled: bool = False
    weight: float = 0.1
    kind: Literal["cosine", "mse", "infonce"] = "cosine"
    temperature: float = 0.1
    features: tuple[str, ...] = ("item_id", "user_id")
    # what the student's rows are aligned to: text = the teacher's text embeddings; teacher = the
    # trained teacher ranker's own user / item ID rows (hints: the large ranker's hidden
    # representations, wider than the student's, read from its checkpoint)
    target: Literal["text", "teacher"] = "text"
    # where the target rows live during training: replicated = every rank holds all of them;
    # sharded = a frozen row_wise table, each rank holds 1/W of the rows and a batch's rows come
    # through the same all-to-all as the ID tables (sparse_kd.distill.targets); auto = sharded when
    # several ranks would each hold more than 1 GiB of them, else replicated. Same loss either way.
    layout: Literal["auto", "replicated", "sharded"] = "auto"


@dataclass(frozen=True)
class TransferConfig:
    """Weight transfer: ID rows from projected text.

    init: before training, rows are seeded through ``projection`` (pca, or learned = ridge fit to
    the teacher ranker's rows) at RMS ``scale``. refit: after training, rows of entities with
    fewer than ``refit_min_count`` training interactions (never-seen items) are replaced by a
    ridge regression from text to the student's own trained rows (fitted on the others), so
    cold rows say what the text says, in the space the student actually learned.
    """

    enabled: bool = False
    init: bool = True
    projection: Literal["pca", "learned"] = "pca"
    scale: float = 0.05  # RMS of the seeded rows
    refit: bool = True
    refit_features: tuple[str, ...] = ("item_id",)
    refit_min_count: int = 1
    ridge_l2: float = 1.0
    features: tuple[str, ...] = ("item_id", "user_id")


@dataclass(frozen=True)
class PairKDConfig:
    """Logit KD beyond the observed pairs: every training batch also carries ``ratio`` times as
    many sampled (user, item) pairs that are not training interactions, with the teacher
    ranker's logits on them as the only target (weight ``weight``, temperature ``temperature``).

    Users are drawn with probability proportional to (train interactions + 1)^``user_power``,
    items to (train interactions + 1)^``item_power``: 0 draws uniformly over the whole catalogue
    (never-seen items included), so rarely clicked items get far more teacher targets than
    clicks. The pool is drawn once per run (seeded) and reshuffled every epoch.
    """

    enabled: bool = False
    ratio: float = 1.0
    weight: float = 0.5
    temperature: float = 1.0
    user_power: float = 1.0
    item_power: float = 0.0


@dataclass(frozen=True)
class HistoryAttentionConfig:
    """The teacher ranker's target attention over the user's earlier train clicks (DIN-style; see
    :mod:`sparse_kd.distill.attention`): ``max_len`` most recent clicks, attention dim ``dim``,
    ``kind`` din (activation-unit MLP of ``hidden`` units) or dot, ``item_ids``: a learned ID row
    per item beside its text."""

    enabled: bool = False
    max_len: int = 50
    dim: int = 32
    kind: Literal["din", "dot"] = "din"
    hidden: int = 32
    item_ids: bool = True


@dataclass(frozen=True)
class TeacherRankerConfig:
    """The teacher ranker the students learn from (logits, sampled pairs, learned transfer).

    By default it is the student's architecture plus PCA-reduced text as dense features. It can be
    made larger than the student, which is where distillation has knowledge to carry: wider
    tables (``embedding_dim``), deeper MLPs (``dense_arch``, ``over_arch``), torchrec's DCN
    interaction (``interaction: dcn``: ``DLRM_DCN``, ``dcn_layers`` low-rank cross layers of rank
    ``dcn_rank``) and the full text embeddings (``text_dim: -1``). The students never see any of
    this: the served model stays the small DLRM.

    embedding_dim: 0 -> ``student.embedding_dim``. dense_arch / over_arch: empty -> the student's
    (dense_arch must end at the teacher's embedding_dim, over_arch at 1).
    text_dim: text dims per entity as dense features: 0 -> ``student.teacher_text_dim`` (PCA),
    -1 -> every dim of the text embedding (no PCA cut), k > 0 -> PCA to k.
    history_pair: add a dense pair feature, the mean cosine between the item's text and the
    texts of the other items the user clicked in train (see :mod:`sparse_kd.distill.history`).
    history_attention: the user's behaviour as a sequence, target attention over the items the
    user clicked before (:class:`HistoryAttentionConfig`).
    ensemble: K members of this teacher, each trained from its own seed; the teacher is their mean
    logit (:mod:`sparse_kd.student.ensemble`). K times the cost; 1: one model.
    from_run: a run folder whose trained teacher ranker is reused instead of training one (``{seed}``
    is replaced by the seed: ``runs/NAME/seed_{seed}`` pairs a study's seeds); the teacher is then
    as that run's config.yaml defines it, so every other key here stays at its default
    (:mod:`sparse_kd.teacher_source`).
    features_layout: where the users' and the items' text features (U x text dims, I x text dims)
    are held while the teacher trains or predicts: ``replicated`` (every rank all of them),
    ``sharded`` (a frozen row_wise table split over the ranks, looked up per batch through
    torchrec's all-to-all, as ``distill.align.layout: sharded`` holds alignment targets; text dims
    must be a multiple of 4), or ``auto`` (each side sharded on several ranks above 1 GiB
    replicated). The same model either way: where the rows are held, not what the teacher
    computes (checkpoints load across layouts). With ``text_dim: -1``, ``sharded`` lets the text
    rows themselves stay split over the ranks (the items' only without history attention).
    """

    history_pair: bool = False
    embedding_dim: int = 0
    dense_arch: tuple[int, ...] = ()
    over_arch: tuple[int, ...] = ()
    interaction: Literal["dot", "dcn"] = "dot"
    dcn_layers: int = 3
    dcn_rank: int = 64
    text_dim: int = 0
    history_attention: HistoryAttentionConfig = field(default_factory=HistoryAttentionConfig)
    ensemble: int = 1
    from_run: str = ""
    features_layout: Literal["auto", "replicated", "sharded"] = "auto"


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from the text teacher; each method on/off and weighted.

    user_text: what stands for a user's text wherever user text is used (teacher ranker inputs,
    alignment targets, weight transfer): ``text`` (the user's own text), ``history`` (the mean
    teacher embedding of the items the user clicked in train), ``both`` (the two concatenated),
    or ``auto`` (``history`` when the dataset has no user text, else ``text``).
    """

    user_text: Literal["auto", "text", "history", "both"] = "auto"
    teacher_ranker: TeacherRankerConfig = field(default_factory=TeacherRankerConfig)
    logit: LogitKDConfig = field(default_factory=LogitKDConfig)
    pairs: PairKDConfig = field(default_factory=PairKDConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)

    @property
    def any_enabled(self) -> bool:
        return self.logit.enabled or self.pairs.enabled or self.align.enabled or self.transfer.enabled


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run control. ``batch_size`` is global (split across ranks)."""

    epochs: int = 3
    batch_size: int = 256
    dense_lr: float = 0.005
    sparse_lr: float = 0.05
    # rowwise_adagrad keeps one accumulator per row (the production choice for memory); adagrad one
    # per coordinate (state as large as the table): on ML-100K, with embedding_l2, it brought the
    # baseline from ~0.009 to ~0.003 AUC below matrix factorisation (docs/studies/DISTILLATION.md);
    # adam (as MF trains its rows) needs data_parallel tables on CPU (FBGEMM's CPU kernel has none).
    # data_parallel tables take this optimizer and sparse_lr as the sharded ones do (student/optim.py)
    sparse_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    # L2 regularisation: of the dense parameters (Adam's weight_decay), and of the embedding rows
    # a batch touches (embedding_l2 x mean squared norm of the pooled embeddings, added to the loss)
    weight_decay: float = 0.0
    embedding_l2: float = 0.0
    seed: int = 0
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    checkpoint_every: int = 0  # steps; 0: at the end of each epoch only
    keep_checkpoints: int = 2
    log_every: int = 20
    eval_batch_size: int = 4096
    collective_timeout_s: int = 300
    # auto: deterministic kernels on CPU; on CUDA only when CUBLAS_WORKSPACE_CONFIG is set (cuBLAS needs
    # it, and deterministic CUDA kernels cost speed); true / false force it
    deterministic: Union[bool, Literal["auto"]] = "auto"
    # model selection on valid (the ``valid`` split's AUC): keep the epoch with the best score as
    # the result, and stop after ``early_stop_patience`` epochs without improvement (0: never)
    select_best: bool = False
    early_stop_patience: int = 0
    # also train an outside reference on the same splits (rank 0, after the rankers): matrix
    # factorisation with biases, student.embedding_dim dims, lr x weight_decay tuned and epochs
    # stopped on valid (sparse_kd/mf_reference.py); a row of metrics.md, `mf_reference` in metrics.json
    mf_reference: bool = False
