"""An agent with a tool set of realistic size and a task whose allowed tools change with its state:
lesson 6's request material.

The agent works in a sandbox with a browser, a shell and a file system, and talks to its user
through messages: 26 tools in four groups whose names share a prefix (``browser_*``, ``file_*``,
``message_*``, ``shell_*``), each with a real JSON schema, in one fixed order (sorted by name).
A small state machine decides which groups the next step may use: a user message must be
answered first (``reply``), a web page is being read (``browse``), commands are running
(``shell``), files are being changed (``edit``). Each state allows its own group plus the
messages (the agent may always talk to its user), except ``reply``, which allows the messages
alone.

The task is scripted, like the other lessons' traces: every step names its state, the call the
agent made and what the tool answered, so every variant sees the same history and every run
renders the same tokens. A coding agent switches state often (read a page, run a command, edit a
file, run the build again): this task changes state on 11 of its 14 steps.

The schemas bound strings with ``maxLength`` only where the bound is short (a session id, a key):
xgrammar compiles a bound as a counted repetition, and with bounds of 100 to 2,000 characters on
every string, compiling the four states' constraints took 6.6 to 13.5 s each (measured
2026-12-02 on a 2-core AVX-512 machine with other work running), against 0.06 to 0.6 s without
them.

Everything here is fixed data; how a request is built from it is the lesson's business.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

Tool = dict[str, Any]


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> Tool:
    """One tool in the OpenAI ``tools`` format (what chat templates render into the prompt)."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": False,
            },
        },
    }


_SESSION = {
    "type": "string",
    "description": "Shell session id; a new id starts a new session.",
    "maxLength": 32,
}
_PATH = {"type": "string", "description": "Absolute path inside the sandbox."}

TOOLS: list[Tool] = sorted(
    [
        _tool(
            "browser_navigate",
            "Open a URL in the browser and return the visible text with numbered interactive elements.",
            {"url": {"type": "string", "description": "Full URL with scheme."}},
            ["url"],
        ),
        _tool(
            "browser_view", "Return the current page's visible text and interactive elements again.", {}, []
        ),
        _tool(
            "browser_click",
            "Click an interactive element of the current page, by its index or by page coordinates.",
            {
                "index": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Element index from the last view.",
                },
                "x": {"type": "number", "description": "Horizontal coordinate, when no index fits."},
                "y": {"type": "number", "description": "Vertical coordinate, when no index fits."},
            },
            ["index"],
        ),
        _tool(
            "browser_input",
            "Type text into an input element, replacing what it holds.",
            {
                "index": {"type": "integer", "minimum": 0},
                "text": {"type": "string"},
                "press_enter": {"type": "boolean", "description": "Press Enter after typing."},
            },
            ["index", "text", "press_enter"],
        ),
        _tool(
            "browser_scroll",
            "Scroll the current page.",
            {
                "direction": {"type": "string", "enum": ["up", "down", "top", "bottom"]},
                "pixels": {"type": "integer", "minimum": 1, "maximum": 5000},
            },
            ["direction"],
        ),
        _tool(
            "browser_find_text",
            "Find text on the current page; returns each match with its line.",
            {
                "text": {"type": "string"},
                "case_sensitive": {"type": "boolean"},
            },
            ["text"],
        ),
        _tool(
            "browser_press_key",
            "Press a key or a key combination in the browser, e.g. Enter or Control+F.",
            {"key": {"type": "string", "maxLength": 40}},
            ["key"],
        ),
        _tool("browser_back", "Go back to the previous page.", {}, []),
        _tool(
            "shell_exec",
            "Run a command in a shell session and return its output when it finishes or times out.",
            {
                "session_id": _SESSION,
                "command": {"type": "string"},
                "cwd": _PATH,
                "timeout_s": {"type": "integer", "minimum": 1, "maximum": 600},
            },
            ["session_id", "command"],
        ),
        _tool(
            "shell_view",
            "Show the latest output of a shell session.",
            {"session_id": _SESSION},
            ["session_id"],
        ),
        _tool(
            "shell_wait",
            "Wait for the running process of a shell session, up to a number of seconds.",
            {"session_id": _SESSION, "seconds": {"type": "integer", "minimum": 1, "maximum": 300}},
            ["session_id"],
        ),
        _tool(
            "shell_write_to_process",
            "Write input to the running process of a shell session (answers to a prompt).",
            {
                "session_id": _SESSION,
                "input": {"type": "string"},
                "press_enter": {"type": "boolean"},
            },
            ["session_id", "input", "press_enter"],
        ),
        _tool(
            "shell_kill_process",
            "Stop the running process of a shell session.",
            {"session_id": _SESSION},
            ["session_id"],
        ),
        _tool("shell_list_sessions", "List the shell sessions and whether each one is busy.", {}, []),
        _tool(
            "file_read",
            "Read a text file, optionally a range of lines (numbered from 1).",
            {
                "path": _PATH,
                "start_line": {"type": "integer", "minimum": 1},
                "end_line": {"type": "integer", "minimum": 1},
            },
            ["path"],
        ),
        _tool(
            "file_write",
            "Write a text file, replacing it or appending to it.",
            {"path": _PATH, "content": {"type": "string"}, "append": {"type": "boolean"}},
            ["path", "content"],
        ),
        _tool(
            "file_str_replace",
            "Replace an exact snippet of a file, which must occur exactly once, with new text.",
            {
                "path": _PATH,
                "old_str": {"type": "string"},
                "new_str": {"type": "string"},
            },
            ["path", "old_str", "new_str"],
        ),
        _tool(
            "file_find_by_name",
            "Find files under a folder whose names match a glob pattern.",
            {"path": _PATH, "glob": {"type": "string"}},
            ["path", "glob"],
        ),
        _tool(
            "file_find_in_content",
            "Find lines matching a regular expression in the files under a folder.",
            {"path": _PATH, "regex": {"type": "string"}},
            ["path", "regex"],
        ),
        _tool(
            "file_list",
            "List a folder's files and subfolders.",
            {"path": _PATH, "depth": {"type": "integer", "minimum": 1, "maximum": 5}},
            ["path"],
        ),
        _tool("file_delete", "Delete a file.", {"path": _PATH}, ["path"]),
        _tool(
            "file_move",
            "Move or rename a file.",
            {"source": _PATH, "destination": _PATH},
            ["source", "destination"],
        ),
        _tool(
            "message_notify_user",
            "Tell the user something without waiting for an answer: progress, a result, a link.",
            {
                "text": {"type": "string"},
                "attachments": {"type": "array", "items": _PATH, "maxItems": 5},
            },
            ["text"],
        ),
        _tool(
            "message_ask_user",
            "Ask the user a question and wait for the answer.",
            {
                "text": {"type": "string"},
                "suggested_answers": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            },
            ["text"],
        ),
        _tool(
            "message_report_progress",
            "Update the task's progress indicator in the user's interface.",
            {
                "step": {"type": "string"},
                "percent": {"type": "integer", "minimum": 0, "maximum": 100},
            },
            ["step", "percent"],
        ),
        _tool(
            "message_send_file",
            "Send a file from the sandbox to the user.",
            {"path": _PATH, "caption": {"type": "string"}},
            ["path"],
        ),
    ],
    key=lambda tool: tool["function"]["name"],
)

TOOLS_BY_NAME: dict[str, Tool] = {tool["function"]["name"]: tool for tool in TOOLS}


def tool_name(tool: Tool) -> str:
    return str(tool["function"]["name"])


def group_of(name: str) -> str:
    """A tool's group: its name up to the first underscore (``browser_click`` -> ``browser``)."""
    return name.split("_", 1)[0]


GROUPS: tuple[str, ...] = tuple(sorted({group_of(tool_name(t)) for t in TOOLS}))


@dataclass(frozen=True)
class State:
    """What the agent may do next: the tool groups it may call, and the group an agent that
    prefills the start of the call writes (the one this state is about)."""

    name: str
    groups: tuple[str, ...]
    prefill_group: str
    meaning: str

    def allows(self, tool: str) -> bool:
        return group_of(tool) in self.groups

    def allowed(self, tools: list[Tool]) -> list[Tool]:
        """The tools of ``tools`` this state allows, in their order."""
        return [t for t in tools if self.allows(tool_name(t))]


STATES: dict[str, State] = {
    state.name: state
    for state in [
        State("reply", ("message",), "message", "a user message arrived: answer it before anything else"),
        State("browse", ("browser", "message"), "browser", "reading web pages"),
        State("shell", ("shell", "message"), "shell", "running commands"),
        State("edit", ("file", "message"), "file", "reading and changing files"),
    ]
}

SYSTEM_PROMPT = """\
You are Orbit, an autonomous agent that works for one user inside a Linux sandbox. You have a \
web browser, shell sessions and a file system, and you talk to the user only through the \
message tools.

How you work:
1. Every reply is exactly one tool call; never plain text.
2. Only the tools your current state allows can run; a call to any other tool fails.
3. Read before you write: open a page or read a file before you act on it.
4. Prefer precise edits (file_str_replace) over rewriting whole files.
5. Run the project's own build or tests after every change, and read their output.
6. Keep the user informed at the start and at the end, and answer their messages first.
7. Never print secrets; never run destructive commands (rm -rf, git push --force)."""

TASK = (
    "Our docs site still says the Orbit CLI needs Python 3.8, but release 2.4 dropped 3.8. Fix "
    "the docs repo (git.example.com/orbit/docs), check that the site still builds, and open a "
    "pull request. Tell me when it is up."
)


@dataclass(frozen=True)
class Step:
    """One step of the scripted task: the state the agent was in, the call it made, what came
    back, and a user message that arrived just before the step (if one did)."""

    state: str
    tool: str
    arguments: dict[str, Any]
    result: str
    user_message: str | None = None

    def arguments_json(self) -> str:
        return json.dumps(self.arguments)


DOCS = "/home/agent/docs"

STEPS: list[Step] = [
    Step(
        "reply",
        "message_notify_user",
        {"text": "On it: I will check the install page, fix the docs repo and open a pull request."},
        "delivered",
    ),
    Step(
        "browse",
        "browser_navigate",
        {"url": "https://docs.orbit-cli.dev/install"},
        "Install Orbit\nOrbit CLI requires Python 3.8 or newer.\npip install orbit-cli\n"
        "[0] Quickstart  [1] Changelog  [2] Edit this page on GitHub",
    ),
    Step(
        "browse",
        "browser_find_text",
        {"text": "3.8"},
        "2 matches: line 2 'requires Python 3.8 or newer'; line 17 'tested on Python 3.8 to 3.12'",
    ),
    Step(
        "shell",
        "shell_exec",
        {
            "session_id": "main",
            "command": "git clone https://git.example.com/orbit/docs.git && cd docs && "
            "git checkout -b docs/python-3.9",
            "cwd": "/home/agent",
        },
        "Cloning into 'docs'... done.\nSwitched to a new branch 'docs/python-3.9'",
    ),
    Step(
        "shell",
        "shell_exec",
        {"session_id": "main", "command": "grep -rn '3\\.8' --include='*.md' .", "cwd": DOCS},
        "./install.md:2:Orbit CLI requires Python 3.8 or newer.\n"
        "./install.md:17:Orbit is tested on Python 3.8 to 3.12.\n"
        "./faq.md:41:Python 3.8 is the oldest version we support.",
    ),
    Step(
        "edit",
        "file_read",
        {"path": f"{DOCS}/install.md", "start_line": 1, "end_line": 20},
        "1 # Install Orbit\n2 Orbit CLI requires Python 3.8 or newer.\n3 \n4 ```\n5 pip install orbit-cli\n"
        "6 ```\n[...]\n17 Orbit is tested on Python 3.8 to 3.12.",
    ),
    Step(
        "edit",
        "file_str_replace",
        {
            "path": f"{DOCS}/install.md",
            "old_str": "requires Python 3.8 or newer",
            "new_str": "requires Python 3.9+",
        },
        "replaced 1 occurrence in install.md",
    ),
    Step(
        "shell",
        "shell_exec",
        {"session_id": "main", "command": "make html SPHINXOPTS=-W", "cwd": DOCS, "timeout_s": 300},
        "build succeeded.\nThe HTML pages are in _build/html.",
    ),
    Step(
        "edit",
        "file_read",
        {"path": f"{DOCS}/faq.md", "start_line": 38, "end_line": 44},
        "38 ## Which Python versions are supported?\n39 \n40 We follow the CPython release cycle.\n"
        "41 Python 3.8 is the oldest version we support.",
    ),
    Step(
        "reply",
        "message_notify_user",
        {"text": "Yes: the tested range on the install page gets fixed too, as Python 3.9 to 3.13."},
        "delivered",
        user_message="Also fix the tested range on the install page, please: we test 3.9 to 3.13 now.",
    ),
    Step(
        "edit",
        "file_str_replace",
        {
            "path": f"{DOCS}/faq.md",
            "old_str": "Python 3.8 is the oldest version we support.",
            "new_str": "Python 3.9 is the oldest version we support (since Orbit 2.4).",
        },
        "replaced 1 occurrence in faq.md",
    ),
    Step(
        "shell",
        "shell_exec",
        {
            "session_id": "main",
            "command": "sed -i 's/tested on Python 3.8 to 3.12/tested on Python 3.9 to 3.13/' install.md "
            "&& make html SPHINXOPTS=-W",
            "cwd": DOCS,
            "timeout_s": 300,
        },
        "build succeeded.\nThe HTML pages are in _build/html.",
    ),
    Step(
        "browse",
        "browser_navigate",
        {"url": "file:///home/agent/docs/_build/html/install.html"},
        "Install Orbit\nOrbit CLI requires Python 3.9+.\npip install orbit-cli\n"
        "[0] Quickstart  [1] Changelog",
    ),
    Step(
        "shell",
        "shell_exec",
        {
            "session_id": "main",
            "command": "git commit -am 'docs: Python 3.9+ since Orbit 2.4' && gh pr create --fill",
            "cwd": DOCS,
        },
        "[docs/python-3.9 4be1c2a] docs: Python 3.9+ since Orbit 2.4\n 2 files changed\n"
        "https://git.example.com/orbit/docs/pull/318",
    ),
    Step(
        "reply",
        "message_notify_user",
        {
            "text": "Done: https://git.example.com/orbit/docs/pull/318 updates install.md and faq.md "
            "to Python 3.9+ (tested 3.9 to 3.13); the site builds without warnings."
        },
        "delivered",
    ),
]


def state_changes(steps: list[Step]) -> int:
    """How many steps run in another state than the step before them."""
    return sum(1 for before, step in zip(steps, steps[1:], strict=False) if step.state != before.state)
