"""Reference documents and the questions asked about them: lesson 3's request material.

An agent that answers questions about a codebase carries the same instructions, tool schemas
and retrieved documents on every request and asks one short question at the end: the shape
where a cache breakpoint pays, because nearly the whole prompt repeats. The documents describe
the billing service of the agent's recorded task (``harness.scenario``), so the lessons share
one world; the questions are answerable from the documents and the system prompt.

Everything here is fixed text: every run renders the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    path: str
    text: str


DOCUMENTS_HEADER = "Reference documents"

REFERENCE_DOCUMENTS: list[Document] = [
    Document(
        "services/billing/README.md",
        "The billing service turns usage records into invoices. money.py holds round_amount and "
        "the currency table; invoice.py builds invoices and their totals; tax.py computes VAT per "
        "country from the rates in tax_rates.yaml. Invoice totals are rounded once, at the end, "
        "with ROUND_HALF_UP to the currency's minor unit; line items are never rounded on their "
        "own. Supported currencies: EUR, USD, GBP and CHF with 2 decimal places, JPY with 0. Run "
        "the tests with `pytest services/billing/tests`; `-k invoice` runs only the invoice tests.",
    ),
    Document(
        "docs/runbooks/billing.md",
        "Wrong invoice totals in production: page the billing on-call (PagerDuty service "
        "billing-primary, Slack #billing-oncall), then stop the nightly export by turning the flag "
        "billing.invoice_export off. Do not edit issued invoices; corrections are credit notes "
        "created with scripts/credit_note.py. A release is rolled back with `deploy rollback "
        "billing`, never by force-pushing to main. After the incident, add a regression test next "
        "to the failing one and link the incident in CHANGELOG.md.",
    ),
    Document(
        "services/billing/flags.yaml",
        "billing.invoice_export: on (nightly export of issued invoices to the ledger)\n"
        "billing.tax_v2: off (new VAT engine, shadow mode only)\n"
        "billing.multi_currency_credit: off (credit notes in a currency other than the invoice's)\n"
        "billing.strict_rounding_checks: on (fail the build when a total differs from the sum of "
        "its rounded parts by more than one minor unit)",
    ),
]

QUESTIONS: list[str] = [
    "Which tool do I use to read services/billing/money.py?",
    "What rounding mode must invoice totals use?",
    "How do I run only the invoice tests?",
    "Who do I page when invoice totals are wrong in production?",
    "Which currencies does the billing service support?",
    "May I force-push to main to undo a bad release?",
    "Which feature flag stops the nightly invoice export?",
    "How many decimal places does JPY use?",
    "What is the longest a shell command may run?",
    "Where is the VAT calculation implemented?",
    "What must I do before editing a file?",
    "How do I correct an invoice that was already issued?",
]

# Asked by the request that carries lesson 3's misuse (a retrieval time in the documents' header).
MISUSE_QUESTION = "Is the new VAT engine switched on?"
MISUSE_DELAY_S = 437.0  # simulated seconds after the first request that the misuse request is built


def reference_documents(quick: bool = False) -> list[Document]:
    """The documents an agent retrieved for the task; quick mode keeps one so tests run fast."""
    return REFERENCE_DOCUMENTS[:1] if quick else list(REFERENCE_DOCUMENTS)


def documents_body(quick: bool = False) -> str:
    """The documents as prompt text, one ``--- path`` section each (the header is the caller's)."""
    return "\n\n".join(f"--- {d.path}\n{d.text}" for d in reference_documents(quick))
