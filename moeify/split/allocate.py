"""How many experts, which top-k, how many shared: the layout a split request resolves to.

A user asks for a share of the FFN per token (`--active`, default one half) and perhaps a number of
routed experts; the rest follows from rules measured on SmolLM2-135M (docs/quality.md):
- Shared (always-on) experts were the largest single win at every activation ratio, and the best rows
  spent about half of the active neurons on them: 48 routed top-16 + 16 shared at 50%, 28 top-4 + 4 at
  25%. So the shared block gets half of the active share, the routed experts the other half.
- Finer experts were better at equal activation (64 blocks beat 32, 16 and 8 with shared experts on), so
  without `--experts` the FFN is cut into 64 blocks, never smaller than 16 neurons: the rule follows the
  model's FFN width, not its name.
Explicit `--top-k` / `--shared` always win over the rules; `--active` with both is a contradiction. A
concrete routed layout (`--experts 8 --top-k 2`) gets no shared experts unless asked: it is what a user
who wants a Mixtral-style checkpoint types.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeify.errors import UsageError

DEFAULT_ACTIVE = 0.5
DEFAULT_BLOCKS = 64  # routed + shared experts when --experts is not given (measured best granularity)
MIN_EXPERT_NEURONS = 16


@dataclass(frozen=True)
class Allocation:
    experts: int
    top_k: int
    shared: int
    why: str  # one line for the user: what was chosen and from what

    def ratio(self) -> float:
        """Active share of the FFN per token, before padding and dense layers."""
        return (self.top_k + self.shared) / (self.experts + self.shared)


def allocate(intermediate: int, experts: int | None = None, top_k: int | None = None, shared: int | None = None,
             active: float | None = None) -> Allocation:
    """Resolve the options a user left out; raises UsageError for requests that cannot be met."""
    if active is not None and not 0 < active <= 1:
        raise UsageError(f"--active must be in (0, 1], got {active}", "e.g. --active 0.5 for half of the FFN")
    if active is not None and top_k is not None and shared is not None:
        raise UsageError("--active, --top-k and --shared together over-determine the split",
                         "give --active alone (it picks --top-k and --shared), or --top-k and --shared")
    if experts is not None and experts < 1:
        raise UsageError(f"--experts must be at least 1 (got {experts})", "e.g. --experts 8")
    r = DEFAULT_ACTIVE if active is None else active
    if top_k is not None and shared is not None:
        e = experts if experts is not None else default_blocks(intermediate) - shared
        return Allocation(max(1, e), top_k, shared, f"{max(1, e)} routed experts (top-{top_k}) + {shared} shared")
    chosen = []
    if experts is None:
        blocks = default_blocks(intermediate)
        shared = shared if shared is not None else (0 if r >= 1 else max(1, min(blocks - 1, round(blocks * r / 2))))
        experts = max(1, blocks - shared)
        chosen.append(f"{experts} routed experts")
    if shared is None and top_k is not None:
        # A concrete routed layout (`--experts 8 --top-k 2`) is honoured as given; with --active, the shared
        # experts make up the rest of the requested share: (k + S) / (E + S) = r.
        shared = 0 if active is None or r >= 1 else max(0, round((r * experts - top_k) / (1 - r)))
    elif shared is None:
        shared = 0 if r >= 1 else max(1, round(experts * (r / 2) / (1 - r / 2)))  # S / (E + S) = r / 2
    chosen.append(f"{shared} shared")
    if top_k is None:
        top_k = _closest_top_k(experts, shared, r)
        chosen.append(f"top-{top_k}")
    alloc = Allocation(experts, top_k, shared, "")
    asked = f"asked {r:.0%}" if active is not None else "default --active 0.5"
    return Allocation(experts, top_k, shared, f"chose {', '.join(chosen)}: {alloc.ratio():.0%} of the FFN per "
                                              f"token ({asked})")


def default_blocks(intermediate: int) -> int:
    """Routed + shared experts when --experts is not given: 64, with experts of at least 16 neurons."""
    return max(2, min(DEFAULT_BLOCKS, intermediate // MIN_EXPERT_NEURONS))


def _closest_top_k(experts: int, shared: int, r: float) -> int:
    """The top-k whose active share is nearest to r (the cheaper one on a tie)."""
    best = min(range(1, experts + 1), key=lambda k: (abs((k + shared) / (experts + shared) - r), k))
    return best
