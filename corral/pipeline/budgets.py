"""Budgets that cannot be escaped: a run's budget bounds the cost of its whole call tree.

An agent can spend through other apps (``sdk.call_agent``): each callee is a run of its own,
billed to the same user. So a run's ``budget_per_run`` bounds its *subtree*: the run itself
plus every run it started, directly or through its callees. The root's budget bounds the
whole tree; a callee's own budget bounds the part of the tree below it.

Cost is what the host observed, billed or not: model tokens and forwarded bridge calls as
the bridge recorded them, sandbox seconds recorded when an execution ends, and for a run
still running the seconds since it started (its sandbox is alive and costs, whether it works
or waits on a callee). It is read for a whole tree in one go (``store.runs.tree``).
Costs and budgets are exact ``Decimal`` credits (``docs/design/ledger.md``): a tree has spent
its budget exactly when it has, not when float rounding says so.

Enforced at two points. Admission: a callee is refused (``BudgetExhausted``, 402) if its
caller or any run above it has already spent its budget. While running: every worker asks
for its run every half second, and a run is stopped (token revoked, sandbox torn down) as
soon as its own or any ancestor's subtree has reached its budget; every running run of an
overspent tree is stopped the same way by its own worker, and a queued one fails before it
boots.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from corral.billing.amounts import credits, to_micros
from corral.billing.ledger import Ledger
from corral.states import RunStatus
from corral.store import Run, Store, TreeMember


@dataclass(frozen=True)
class Overspent:
    """The run (``run`` itself or one of its callers) whose subtree reached its budget."""

    run: str
    owner: str  # the run whose budget is spent
    spent: Decimal
    budget: Decimal

    def reason(self, outcome: str = "its token was revoked and its sandbox torn down") -> str:
        if self.owner == self.run:
            return (
                f"the run and the runs it called spent {self.spent:.4f} of its {self.budget} "
                f"credits; {outcome}"
            )
        return (
            f"its caller {self.owner} and the runs that one called spent {self.spent:.4f} of "
            f"{self.owner}'s budget of {self.budget} credits; {outcome}"
        )


class CallTree:
    """A call tree's runs and the cost of each run's subtree."""

    def __init__(self, members: list[TreeMember], ledger: Ledger, now: datetime) -> None:
        self.members = {m.id: m for m in members}
        self.own = {m.id: _own_cost(m, ledger, now) for m in members}
        children: dict[str, list[str]] = defaultdict(list)
        for m in members:
            if m.parent_run is not None and m.parent_run in self.members:
                children[m.parent_run].append(m.id)
        self._children = children
        self._subtree: dict[str, Decimal] = {}

    def subtree(self, run: str) -> Decimal:
        """What ``run`` and every run below it have cost so far."""
        if run not in self._subtree:
            total, stack = Decimal(0), [run]
            while stack:  # iterative: a tree is shallow but may be wide
                node = stack.pop()
                total += self.own.get(node, Decimal(0))
                stack.extend(self._children.get(node, ()))
            self._subtree[run] = total
        return self._subtree[run]

    def overspent(self, run: str) -> Overspent | None:
        """The nearest of ``run`` and its ancestors whose subtree has reached its budget."""
        node: str | None = run
        seen: set[str] = set()
        while node is not None and node in self.members and node not in seen:
            seen.add(node)
            member = self.members[node]
            if member.budget is not None:
                spent = self.subtree(node)
                budget = credits(to_micros(member.budget, "budget_per_run"))
                if spent >= budget:
                    return Overspent(run, node, spent, budget)
            node = member.parent_run
        return None


class Budgets:
    def __init__(self, store: Store, ledger: Ledger) -> None:
        self.store = store
        self.ledger = ledger

    def tree(self, run: Run, now: datetime | None = None) -> CallTree:
        """The call tree ``run`` belongs to, costed as of ``now``."""
        members = self.store.runs.tree(run.root)
        return CallTree(members, self.ledger, now or datetime.now(UTC))

    def overspent(self, run: Run, now: datetime | None = None) -> Overspent | None:
        return self.tree(run, now).overspent(run.id)


def _own_cost(member: TreeMember, ledger: Ledger, now: datetime) -> Decimal:
    seconds = member.sandbox_seconds
    if member.status == RunStatus.RUNNING and member.started_at is not None:
        # Not recorded until the execution ends: count the time it has been running so far.
        seconds += max(0.0, (now - member.started_at).total_seconds())
    return ledger.price(member.input_tokens, member.output_tokens, seconds, member.bridge_calls)
