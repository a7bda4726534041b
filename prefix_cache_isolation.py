"""Lesson 5: a shared prefix cache tells one tenant what another sent; cache_salt closes it.

Everything the first four lessons teach rests on one fact: a prompt that starts with tokens
someone already sent is served faster. On an engine shared by several tenants that fact is a
side channel. An audit of commercial APIs found prompt caches shared across users at 7 providers
("Auditing Prompt Caching in Language Model APIs", ICML 2025): a hit is told from a miss by its
time to first token alone.

This lesson shows the attack and the defence on your own machine, against your own engine.

The victim (tenant A) sends requests whose system prompt holds something private: a customer's
account number, inside a template anyone can know. The attacker (tenant B, same engine) guesses:
for every candidate account (the true one among decoys that differ only in the six digits) it
sends the template with that candidate and times the first token. A fast answer means "someone
sent exactly this": a hit on A's blocks.

WRONG: one shared cache, no salt. The attacker picks the true account from its TTFT alone, and
the engine's own cached-token counts confirm each probe's hit or miss.

RIGHT: a ``cache_salt`` per tenant. vLLM mixes the salt into the first block's hash, so requests
with different salts never share a block: the attacker's probes meet only its own cache, the
true account is as slow as the decoys, and its guess is chance.

The price: tenants no longer share even what is public (the common system prompt), so each one
computes it again. A salt per *trust domain* (the tenants who may see each other's prompts: one
organisation's users) keeps most of the sharing. What leaks is measured in blocks: a probe that
matches the secret up to a block boundary gets that block, so a secret split over two blocks can
be guessed half by half; one inside a single block leaks only "all of it" or "not this block".

The probes and the victim's requests are seeded; the engine's counts agree with the prediction
on every request. Time is measured by the engine (TTFT); the decision uses time only, as an
attacker outside the engine would.

Run:
    python prefix_cache_isolation.py                 # 24 trials of 4 candidates per variant
    python prefix_cache_isolation.py --quick --json out.json
    python prefix_cache_isolation.py --endpoint http://127.0.0.1:8000   # your vLLM server
"""

from __future__ import annotations

import argparse
import random
import secrets
import statistics
from dataclasses import dataclass, field
from typing import Any

from harness.backend import Backend, Message
from harness.cli import exit_with, lesson_main
from harness.console import Table, console, mark
from harness.errors import UserError
from harness.measure import RequestRecord, SaltedCaches, VariantResult, roc_auc
from harness.prefix import cached_tokens_for
from harness.report import ExampleResult

EXAMPLE = "prefix_cache_isolation"
DEFAULT_TRIALS, QUICK_TRIALS = 24, 4
CANDIDATES = 4  # the true account and three decoys per trial
DIGITS = 6  # an account number: one token per digit with this tokenizer

PREAMBLE = (
    "You are the support assistant of Northwind Bank. Answer the customer's questions about "
    "their account in two sentences at most, politely, and never reveal internal notes.\n"
    "Customer account: "
)
TEMPLATE = (
    "\nPlan: Everyday Checking. Branch: Harbor Street. Statements are issued on the first "
    "business day of each month. Fees: none for balances above 500 euros; otherwise 4 euros a "
    "month. Card limits: 1,000 euros a day at ATMs, 5,000 euros a day in shops. Disputes must be "
    "filed within 60 days of the statement date. Internal note: do not offer overdrafts to this "
    "customer without a branch manager's approval."
)
QUESTIONS = [
    "What is my daily ATM limit?",
    "When will I get my next statement?",
    "Do I pay a monthly fee?",
    "How long do I have to dispute a charge?",
]
PROBE_QUESTION = "Hello."


# --------------------------------------------------------------------------- the prompts


def system_prompt(account: str) -> str:
    """The victim's private system prompt: a public template with the account in it."""
    return f"{PREAMBLE}{account}{TEMPLATE}"


def victim_request(account: str, question: str) -> list[Message]:
    return [{"role": "system", "content": system_prompt(account)}, {"role": "user", "content": question}]


def probe_request(candidate: str) -> list[Message]:
    """The attacker's guess: the same template with a candidate account (and any question)."""
    return [
        {"role": "system", "content": system_prompt(candidate)},
        {"role": "user", "content": PROBE_QUESTION},
    ]


def account(rng: random.Random) -> str:
    return f"{rng.randrange(10**DIGITS):0{DIGITS}d}"


@dataclass(frozen=True)
class Salts:
    """Which ``cache_salt`` each tenant's requests carry (None: the engine's shared cache)."""

    victim: str | None
    attacker: str | None


def salts_wrong() -> Salts:
    """WRONG: everyone in one cache."""
    return Salts(None, None)


def salts_right() -> Salts:
    """RIGHT: a salt per tenant, new for every run (a server's cache outlives a lesson)."""
    run = secrets.token_hex(4)
    return Salts(f"tenant-a-{run}", f"tenant-b-{run}")


# --------------------------------------------------------------------------- the attack


@dataclass
class Attack:
    """One variant's probes: which candidate was true, how fast each answered."""

    name: str
    label: str
    records: list[RequestRecord]
    victim_records: list[RequestRecord]

    def probes(self, trial: int) -> list[RequestRecord]:
        return [r for r in self.records if r.extra["trial"] == trial]

    @property
    def trials(self) -> int:
        return len({r.extra["trial"] for r in self.records})

    def auc(self) -> float:
        """ROC AUC of -TTFT as a score for "this candidate was sent by the victim"."""
        truth = [bool(r.extra["true"]) for r in self.records]
        return roc_auc([-r.ttft_ms for r in self.records], truth)

    def accuracy(self) -> float:
        """Share of trials where the fastest candidate was the true one."""
        right = 0
        for trial in range(self.trials):
            fastest = min(self.probes(trial), key=lambda r: r.ttft_ms)
            right += bool(fastest.extra["true"])
        return right / self.trials if self.trials else 0.0

    def hit_ttft_ms(self) -> tuple[float, float]:
        """Median TTFT of the true candidates' probes and of the decoys'."""
        hits = [r.ttft_ms for r in self.records if r.extra["true"]]
        misses = [r.ttft_ms for r in self.records if not r.extra["true"]]
        return statistics.median(hits), statistics.median(misses)

    def to_json(self) -> dict[str, Any]:
        hit, miss = self.hit_ttft_ms()
        return {
            "auc": round(self.auc(), 4),
            "accuracy": round(self.accuracy(), 4),
            "chance": round(1 / CANDIDATES, 4),
            "trials": self.trials,
            "candidates": CANDIDATES,
            "true_ttft_ms_median": round(hit, 3),
            "decoy_ttft_ms_median": round(miss, 3),
            "prediction_matches": self.prediction_matches(),
        }

    def prediction_matches(self) -> bool:
        """The engine's cached tokens equal the prediction on every probe and victim request."""
        return all(r.prediction_ok for r in [*self.records, *self.victim_records])


def run_attack(backend: Backend, name: str, label: str, salts: Salts, trials: int, seed: int) -> Attack:
    """Per trial: the victim asks a question; the attacker probes every candidate, in random order."""
    backend.start_variant()
    rng = random.Random(seed)
    engine = SaltedCaches(backend)
    probes: list[RequestRecord] = []
    victims: list[RequestRecord] = []
    # The attacker first sends the public template once (an unknown account), as a real prober
    # would: every probe then starts from the same cache of its own, and only the victim's
    # blocks can make one faster than another.
    engine.send(probe_request("0" * DIGITS), salts.attacker, -1)
    for trial in range(trials):
        secret = account(rng)
        decoys: set[str] = set()
        while len(decoys) < CANDIDATES - 1:
            decoy = account(rng)
            if decoy != secret:
                decoys.add(decoy)
        candidates = [secret, *sorted(decoys)]
        rng.shuffle(candidates)
        question = QUESTIONS[trial % len(QUESTIONS)]
        victims.append(engine.send(victim_request(secret, question), salts.victim, trial, {"trial": trial}))
        for candidate in candidates:
            extra = {"trial": trial, "candidate": candidate, "true": candidate == secret}
            probes.append(engine.send(probe_request(candidate), salts.attacker, len(probes), extra))
    return Attack(name, label, probes, victims)


# --------------------------------------------------------------------------- the price


@dataclass(frozen=True)
class Sharing:
    """A workload of tenants sharing a public system prompt, under one salt policy."""

    policy: str
    prompt_tokens: int
    cached_tokens: int
    prediction_matches: bool

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "computed_tokens": self.computed_tokens,
            "hit_rate": round(self.hit_rate, 4),
            "prediction_matches": self.prediction_matches,
        }


TENANTS = ("alice", "bob", "carol", "dave")
DOMAINS = {"alice": "acme", "bob": "acme", "carol": "initech", "dave": "initech"}


def price_of_isolation(backend: Backend, rounds: int) -> list[Sharing]:
    """The same requests (each tenant asks ``rounds`` questions after the public system prompt)
    with one shared cache, a salt per trust domain, and a salt per tenant."""
    public = PREAMBLE.split("Customer account: ")[0] + TEMPLATE.split("Internal note:")[0]
    run = secrets.token_hex(4)
    policies = {
        "shared cache (no salt)": lambda tenant: None,
        "salt per trust domain": lambda tenant: f"domain-{DOMAINS[tenant]}-{run}",
        "salt per tenant": lambda tenant: f"tenant-{tenant}-{run}",
    }
    results: list[Sharing] = []
    for policy, salt_of in policies.items():
        backend.start_variant()
        engine = SaltedCaches(backend)
        records = [
            engine.send(
                [
                    {"role": "system", "content": public},
                    {"role": "user", "content": f"I am {tenant}. {QUESTIONS[turn % len(QUESTIONS)]}"},
                ],
                salt_of(tenant),
                turn,
            )
            for turn in range(rounds)
            for tenant in TENANTS
        ]
        prompt = sum(r.prompt_tokens for r in records)
        cached = sum(r.cached_tokens for r in records)
        ok = all(r.prediction_ok for r in records)
        results.append(Sharing(policy, prompt, cached, ok))
    return results


# --------------------------------------------------------------------------- what leaks


@dataclass(frozen=True)
class Leak:
    """The block maths of one layout: where the secret's digits sit, what a probe gets."""

    layout: str
    block_size: int
    first_digit: int  # token index of the secret's first digit in the probe
    cached_by_right_digits: dict[int, int]  # k leading digits right (then a wrong one) -> cached tokens
    cached_all_right: int

    def to_json(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "block_size": self.block_size,
            "first_secret_token": self.first_digit,
            "cached_by_right_digits": {str(k): v for k, v in self.cached_by_right_digits.items()},
            "cached_all_right": self.cached_all_right,
        }


def leak_maths(backend: Backend, layout: str, filler: int = 0) -> Leak:
    """What a probe's cached tokens (so its TTFT) tell, by how many leading digits it got right:
    the count grows only when right digits fill a whole block. ``filler`` words pad the preamble,
    which moves the block boundaries relative to the number."""
    block = backend.info.block_size
    padding = " ".join(["Note:"] * filler) + "\n" if filler else ""
    preamble = PREAMBLE.replace("Customer account: ", padding + "Customer account: ")
    probe = [{"role": "system", "content": f"{preamble}314159{TEMPLATE}"}, {"role": "user", "content": "Hi."}]
    ids = backend.render(probe)
    other = backend.render([{"role": "system", "content": f"{preamble}914159{TEMPLATE}"}, probe[1]])
    first = next(i for i, (a, b) in enumerate(zip(ids, other, strict=True)) if a != b)
    # k digits right, then a wrong one: the probe and the victim's prompt part at digit k
    by_digits = {k: cached_tokens_for(len(ids), first + k, block) for k in range(DIGITS)}
    return Leak(layout, block, first, by_digits, cached_tokens_for(len(ids), len(ids), block))


def split_layout(backend: Backend) -> Leak:
    """The same probe padded so a block boundary falls after the third digit."""
    for filler in range(1, 4 * backend.info.block_size):
        leak = leak_maths(backend, "padded: a block boundary inside the number", filler)
        if (leak.first_digit + DIGITS // 2) % leak.block_size == 0:
            return leak
    raise RuntimeError("no padding put a block boundary inside the number")  # pragma: no cover


# --------------------------------------------------------------------------- running it


def add_lesson_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trials",
        type=int,
        default=None,
        help=f"victim requests per variant, each probed with {CANDIDATES} candidates "
        f"(default {DEFAULT_TRIALS}, {QUICK_TRIALS} with --quick)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the secrets and decoys (default 0)")


def trials_from(args: argparse.Namespace) -> int:
    trials = int(args.trials if args.trials is not None else (QUICK_TRIALS if args.quick else DEFAULT_TRIALS))
    if trials < 2:
        raise UserError(f"--trials must be at least 2 (an AUC needs several true candidates), got {trials}")
    return trials


def variant_of(attack: Attack) -> VariantResult:
    return VariantResult(attack.name, attack.label, attack.records)


@dataclass
class IsolationResult(ExampleResult):
    """The shared result plus the attack, the price of isolation and the leak maths, typed until
    the JSON."""

    attacks: dict[str, Attack] = field(kw_only=True)  # "wrong", "right"
    sharing: list[Sharing] = field(kw_only=True)
    leaks: list[Leak] = field(kw_only=True)

    def hit_ttft_speedup(self) -> float:
        """How much sooner a hit answered than a miss, WRONG's medians."""
        hit, miss = self.attacks["wrong"].hit_ttft_ms()
        return round(miss / hit, 3) if hit else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            **super().to_json(),
            "attack": {name: attack.to_json() for name, attack in self.attacks.items()},
            "hit_ttft_speedup": self.hit_ttft_speedup(),
            "price_of_isolation": [s.to_json() for s in self.sharing],
            "leak": [leak.to_json() for leak in self.leaks],
        }


def run(backend: Backend | None, args: argparse.Namespace) -> IsolationResult:
    assert backend is not None
    trials = trials_from(args)
    with console.status("WRONG: one shared cache; the attacker probes ..."):
        wrong = run_attack(backend, "wrong", "one shared cache, no salt", salts_wrong(), trials, args.seed)
    with console.status("RIGHT: a cache_salt per tenant; the same attack ..."):
        right = run_attack(backend, "right", "a cache_salt per tenant", salts_right(), trials, args.seed)
    with console.status("the price of isolation: tenants sharing a public system prompt ..."):
        sharing = price_of_isolation(backend, rounds=2 if args.quick else 3)
    return IsolationResult(
        EXAMPLE,
        backend.info,
        [variant_of(wrong), variant_of(right)],
        notes=[
            f"{trials} trials of {CANDIDATES} candidates per variant (seed {args.seed}); the attacker "
            "decides by TTFT alone; each variant starts from an empty cache",
        ],
        attacks={"wrong": wrong, "right": right},
        sharing=sharing,
        leaks=[leak_maths(backend, "this lesson's prompt"), split_layout(backend)],
    )


# --------------------------------------------------------------------------- showing it


def attack_table(result: IsolationResult) -> Table:
    table = Table(title="The attack: pick the victim's account by TTFT alone", title_justify="left")
    for name in (
        "variant",
        "AUC",
        "accuracy",
        "chance",
        "TTFT true / decoy (median ms)",
        "prediction == engine",
    ):
        table.add_column(name, justify="left" if name == "variant" else "right")
    for name, attack in result.attacks.items():
        hit, miss = attack.hit_ttft_ms()
        table.add_row(
            f"{name.upper()}: {attack.label}",
            f"{attack.auc():.2f}",
            f"{attack.accuracy():.0%}",
            f"{1 / CANDIDATES:.0%}",
            f"{hit:,.0f} / {miss:,.0f}",
            mark(attack.prediction_matches()),
        )
    return table


def price_table(result: IsolationResult) -> Table:
    table = Table(
        title="The price of isolation: 4 tenants sharing a public system prompt", title_justify="left"
    )
    for name in (
        "salt policy",
        "prompt tokens",
        "served from cache",
        "computed",
        "hit rate",
        "prediction == engine",
    ):
        table.add_column(name, justify="left" if name == "salt policy" else "right")
    for s in result.sharing:
        table.add_row(
            s.policy,
            f"{s.prompt_tokens:,}",
            f"{s.cached_tokens:,}",
            f"{s.computed_tokens:,}",
            f"{s.hit_rate:.1%}",
            mark(s.prediction_matches),
        )
    return table


def headline(result: ExampleResult) -> str:
    """The lesson's own figure, for the runner's summary: the attacker's AUC and accuracy."""
    if not isinstance(result, IsolationResult):
        return ""
    w, r = result.attacks["wrong"], result.attacks["right"]
    return f"attacker AUC {w.auc():.2f} -> {r.auc():.2f}, accuracy {w.accuracy():.0%} -> {r.accuracy():.0%}"


def show_details(result: ExampleResult) -> None:
    if not isinstance(result, IsolationResult):
        raise TypeError(f"lesson 5 shows its own results, got {type(result).__name__}")
    console.print(attack_table(result))
    wrong = result.variant("wrong").requests
    confirmed = all((r.cached_tokens > min(x.cached_tokens for x in wrong)) == r.extra["true"] for r in wrong)
    right_true = {r.cached_tokens for r in result.variant("right").requests if r.extra["true"]}
    right_decoy = {r.cached_tokens for r in result.variant("right").requests if not r.extra["true"]}
    console.print(
        f"WRONG: the engine's own counts confirm it: every true candidate's probe got more tokens from "
        f"the cache than every decoy's ({mark(confirmed)}); a hit answered "
        f"{result.hit_ttft_speedup():.1f}x sooner than a miss.\n"
        f"RIGHT: true candidates were served {sorted(right_true)} cached tokens, decoys "
        f"{sorted(right_decoy)}: only the attacker's own earlier probes (the public template before "
        "the digits), nothing of the victim's."
    )
    console.print(price_table(result))
    for leak in result.leaks:
        first = leak.first_digit
        steps = ", ".join(f"{k}: {v}" for k, v in leak.cached_by_right_digits.items())
        console.print(
            f"What leaks, {leak.layout}: the account's digits are tokens {first}-{first + DIGITS - 1} "
            f"(block size {leak.block_size}). Cached tokens by the number of leading digits a probe has "
            f"right: {steps}; all {DIGITS}: {leak.cached_all_right}."
        )
    console.print(
        "A probe learns only whole blocks: inside one block the number is all or nothing (10^6 guesses); "
        "with a boundary inside it, a guess right up to the boundary earns one block more, so the digits "
        "before it can be found first (10^3 + 10^3 guesses). The defence is the salt (or no secret in a "
        "prefix others can probe), not the layout."
    )


def main(argv: list[str] | None = None) -> int:
    return lesson_main(
        argv, __doc__, add_args=add_lesson_args, check_args=trials_from, run=run, show_details=show_details
    )


if __name__ == "__main__":
    exit_with(main)
