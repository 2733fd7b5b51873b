"""Task profiles: everything that differs between chart, table and svg, as data.

Each profile is the authors' own pipeline for that task (InternLM/Visual-ERM,
`rl_scripts/reward_func/` and `evaluation/`, at the commits named below): the message layout,
how each image is prepared, the answer's keys in their trained order, the decoding for
judging and for RL, the trained token cap and the reward recipe. The judge, the batch
engine, the server, the RL client and the benchmarks all read them from here; nothing else
branches on the task name."""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import CATEGORIES, TASKS
from .decoding import Sampling
from .errors import InputError
from .reward import NEGATIVE_SEVERITY, RENDER_BASE, RewardRecipe


@dataclass(frozen=True)
class ImagePrep:
    """How one image is made ready, before the vision processor's own resize to multiples
    of 32 px: optionally cropped to its content (background = the top-left pixel's colour,
    `crop_padding` px kept around it), thumbnailed so its longest side is at most
    `max_side`, and encoded as JPEG (lossy, as the model saw it) or PNG. With `svg`, an
    SVG file is first rendered as the authors render SVG for this task (cairosvg at
    336x336 on white); without it an SVG file is refused."""

    max_side: int
    encoding: str  # "jpeg" | "png"
    crop: bool = False
    crop_padding: int = 12
    svg: bool = False

    @property
    def max_tokens(self) -> int:
        """Visual tokens of the largest image this preparation lets through."""
        side = (self.max_side + 31) // 32
        return side * side


@dataclass(frozen=True)
class PromptSource:
    """Where the authors keep a task's training prompt: a file at a pinned commit, and the
    module constant (`assign`) or the function returning it (`function`)."""

    path: str
    commit: str
    kind: str  # "assign" | "function"
    name: str


@dataclass(frozen=True)
class TaskProfile:
    name: str
    categories: tuple[str, ...]
    category_key: str  # the key naming an error's category in the trained answer
    error_keys: tuple[str, ...]  # an error item's keys, in the trained order
    system: str | None  # system message, or None for none
    text_prefix: str  # put before the prompt in the user turn's text part
    gt: ImagePrep
    pred: ImagePrep
    max_tokens: int  # the trained answer cap
    judging: Sampling  # default decoding of `judge` (reproducible)
    rl: Sampling  # the authors' RL decoding (`--sampling rl`)
    reward: RewardRecipe
    prompt: PromptSource
    # Longest strings the constrained answer aims to allow, before the cap decides.
    string_targets: dict[str, int] = field(default_factory=dict)

    @property
    def count_keys(self) -> tuple[str, ...]:
        return tuple(f"{c}_count" for c in self.categories)

    @property
    def has_location(self) -> bool:
        return "location" in self.error_keys

    @property
    def max_image_tokens(self) -> int:
        return max(self.gt.max_tokens, self.pred.max_tokens)


_AUTHORS_RL = "ed7b3810add9f169d12196009638b883f787e31c"
_AUTHORS_TABLE = "d842beca56b5a95c11128a263797dbf4cf0bc9d6"
_RL_FILE = "rl_scripts/reward_func/reward_utils.py"

# chart and svg: reward_utils.py / omnirender_rm_v3.py. No system message; [gt, pred,
# prompt] in one user turn; images thumbnailed to 1024 (MAX_IMG_SIDE), RGB, JPEG.
_JPEG_1024 = ImagePrep(max_side=1024, encoding="jpeg")
_SVG_FILES = ImagePrep(max_side=1024, encoding="jpeg", svg=True)
_CHART_SVG_RL = Sampling(
    max_tokens=4096, temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5
)
_CHART_SVG = dict(
    category_key="category",
    error_keys=("category", "severity", "location", "description"),
    system=None,
    text_prefix="",
    gt=_JPEG_1024,
    pred=_JPEG_1024,
    max_tokens=4096,
    judging=Sampling(max_tokens=4096),  # greedy, so runs reproduce
    rl=_CHART_SVG_RL,
    reward=RENDER_BASE,
    string_targets={"location": 40, "description": 136},
)

PROFILES: dict[str, TaskProfile] = {
    "chart": TaskProfile(
        name="chart",
        categories=CATEGORIES["chart"],
        prompt=PromptSource(_RL_FILE, _AUTHORS_RL, "assign", "PROMPT_CHART2CODE_JUDGEMENT"),
        **_CHART_SVG,
    ),
    # svg: the same request; an SVG file given as an image is rendered as the authors'
    # RL renders the policy's SVG (cairosvg, 336x336, white).
    "svg": TaskProfile(
        name="svg",
        categories=CATEGORIES["svg"],
        prompt=PromptSource(_RL_FILE, _AUTHORS_RL, "assign", "PROMPT_IMG2SVG_JUDGEMENT"),
        **{**_CHART_SVG, "gt": _SVG_FILES, "pred": _SVG_FILES},
    ),
    # table: table_parse_rm_v2.py. A system message; the text starts with two lines of the
    # literal <image>; ground truth thumbnailed to 768 (PNG), the rendered prediction
    # cropped to its content (12 px padding) then thumbnailed to 768; temperature 0 with
    # repetition penalty 1.05 and 8192 tokens, for judging and RL alike.
    "table": TaskProfile(
        name="table",
        categories=CATEGORIES["table"],
        category_key="type",
        error_keys=("type", "description", "severity"),
        system="You are a helpful assistant.",
        text_prefix="<image>\n<image>\n",
        gt=ImagePrep(max_side=768, encoding="png"),
        pred=ImagePrep(max_side=768, encoding="png", crop=True, crop_padding=12),
        max_tokens=8192,
        judging=Sampling(max_tokens=8192, repeat_penalty=1.05),
        rl=Sampling(max_tokens=8192, repeat_penalty=1.05),
        reward=NEGATIVE_SEVERITY,
        prompt=PromptSource(
            "rl_scripts/reward_func/table_parse_rm_v2.py",
            _AUTHORS_TABLE,
            "function",
            "build_error_prompt_for_images",
        ),
        string_targets={"description": 256},
    ),
}
assert set(PROFILES) == set(TASKS)

SAMPLING_MODES = ("default", "greedy", "rl")


def profile(task: str | TaskProfile) -> TaskProfile:
    """The profile of a task, resolved where a request enters (CLI, Python API, server,
    client) and passed down as the object; a profile given is returned as it is. An unknown
    task is the user's error (one line, exit 2)."""
    if isinstance(task, TaskProfile):
        return task
    try:
        return PROFILES[task]
    except (KeyError, TypeError):
        raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}") from None


def decoding(
    p: TaskProfile, mode: str = "default", max_tokens: int | None = None, seed: int | None = None
) -> Sampling:
    """A task's decoding: `default` (judging: greedy; table with its repetition penalty),
    `greedy` (plain argmax), or `rl` (the authors' RL settings); `max_tokens` and `seed`
    override the profile's."""
    if mode not in SAMPLING_MODES:
        raise InputError(f"unknown sampling {mode!r}; choose {', '.join(SAMPLING_MODES)}")
    base = {"default": p.judging, "greedy": Sampling(max_tokens=p.max_tokens), "rl": p.rl}[mode]
    return base.with_(max_tokens=max_tokens, seed=seed)
