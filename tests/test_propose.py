"""The propose stage: its prompts and JSON schema, reading replies (our JSON, our tags, the release's block, LaTeX
written with one backslash), the rejection reasons, the answer-leak test and which attempts get proposals.
Replies are written exactly as engines emit them (raw strings: one backslash is one backslash)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from intgen.backends.base import Completion, Sampling, error_completion
from intgen.grading import grade_items
from intgen.resources import load_prompt, read_prompt
from intgen.stages import Grading, ModelCalls, Part, propose, run_by_hand

from examples import ATTEMPT, STEPS

CONTROL = [chr(c) for c in range(32) if c != 10] + [chr(127)]


def no_control(text: str | None) -> bool:
    return text is None or not any(c in text for c in CONTROL)


def grade_now(ask: Grading) -> list:
    return grade_items(ask.items, workers=2)


# --- prompts ----------------------------------------------------------------------------------------

def test_two_turn_and_single_turn_critique_prompts() -> None:
    turn1_messages = propose.reference_messages("P?", "Ref.", read_prompt("propose_reference.md"))
    two = propose.critique_messages("P?", "Ref.", STEPS, read_prompt("propose_critique.md"),
                                    (turn1_messages, "My sol."))
    assert [m["role"] for m in two] == ["user", "assistant", "user"]
    assert "Ref." in two[0]["content"] and two[1]["content"] == "My sol."
    assert "Substep 2: Tom starts with 3 apples" in two[2]["content"] and "Substep 4" in two[2]["content"]
    assert "Substep 1 to Substep 4" in two[2]["content"]
    one = propose.critique_messages("P?", "Ref.", STEPS, read_prompt("propose_single.md"))
    assert len(one) == 1 and "P?" in one[0]["content"] and "Ref." in one[0]["content"]
    assert "<error_step>" in one[0]["content"]


@pytest.mark.parametrize("name", ["propose_critique.md", "propose_single.md"])
def test_the_proposer_prompt_asks_all_the_release_asks(name: str) -> None:
    [message] = propose.critique_messages("P?", "Ref.", STEPS, read_prompt(name), answer="42")
    text = " ".join(message["content"].split())  # as read, whatever the line breaks
    assert "{{" not in text  # every marker filled
    # "Substep N" is ours, not the attempt's own "### Step N" headings
    assert '("### Step 2", "Step 3:") are not Substep numbers' in text
    # both tests of a critical error, the second by reading the later steps
    assert "factual error" in text and "logical fallacy" in text and "invalidates the current line of reasoning" in text
    assert "not recovered from" in text and "read the later substeps" in text
    # a verification log quoting the attempt; guidance in the student's voice, without the answer
    assert "Verification log" in text and "quote the words or the equation" in text
    assert "as if they had written it" in text and "sketch the next steps" in text
    assert "Do not give away the final answer" in text
    # draft -> the release's three questions -> revision until it passes -> final block
    draft, check = text.index("write a draft"), text.index("Q1.")
    revise = text.index("Repeat until every verdict is No")
    assert draft < check < revise < text.index("<error_step>")
    assert 'Q1. Does the draft contain the exact final answer "42" anywhere?' in text
    assert "Q2. Does the draft miss a key insight" in text and "later than the substep with the first critical" in text
    assert "give 0 as the error step and leave the intervention empty" in text
    # the JSON fields, named in the order the schema has them
    fields = [text.index(f'"{key}"') for key in propose.proposal_schema(4)["properties"]]
    assert fields == sorted(fields)


def test_the_localize_critic_prompt_matches_the_schema_it_is_read_with() -> None:
    text = " ".join(read_prompt("localize_intgen.md").split())
    assert "are not Substep numbers" in text and "not recovered from" in text and "<error_step>" in text
    fields = [text.index(f'"{key}"') for key in propose.proposal_schema(4)["properties"]]
    assert fields == sorted(fields)
    assert "{{answer}}" not in text and "{{reference_solution}}" not in text  # the critic knows neither


# --- the JSON schema --------------------------------------------------------------------------------

def test_proposal_schema_puts_the_draft_and_self_check_before_the_final_intervention() -> None:
    schema = propose.proposal_schema(4)
    # engines generate in key order: the log, the draft and the self-check exist before the final answer
    assert list(schema["properties"]) == ["verification", "draft", "self_check", "error_step", "intervention"]
    assert schema["required"] == list(schema["properties"]) and schema["additionalProperties"] is False
    step = schema["properties"]["error_step"]
    assert (step["type"], step["minimum"], step["maximum"]) == ("integer", 0, 4)  # 0: no critical error
    assert step["enum"] == [0, 1, 2, 3, 4]  # llama.cpp's grammars ignore minimum/maximum
    assert not any("maxLength" in p or "minLength" in p for p in schema["properties"].values())


def test_a_schema_reply_is_stored_with_its_draft_and_self_check() -> None:
    reply = ('{"verification": "Substep 2 adds 3 + 4 as 8.", "draft": "I add again: 3 + 4 is seven. (Substep 2)", '
             '"self_check": "Q1 No. Q2 No. Q3 No.", "error_step": 2, "intervention": "I add again: 3 + 4 is seven."}')
    parsed = propose.parse_proposal(reply, 4, STEPS)
    assert (parsed.reject_reason, parsed.error_step, parsed.intervention) == (None, 2, "I add again: 3 + 4 is seven.")
    assert parsed.verification == ("Substep 2 adds 3 + 4 as 8.\n\nDraft: I add again: 3 + 4 is seven. (Substep 2)"
                                   "\n\nSelf-check: Q1 No. Q2 No. Q3 No.")
    no_error = '{"verification": "all fine", "draft": "", "self_check": "", "error_step": 0, "intervention": ""}'
    assert propose.parse_proposal(no_error, 4).reject_reason == propose.NO_ERROR_FOUND


# --- parsing: a corpus of messy proposer outputs ------------------------------------------------------

CORPUS = [
    # (reply, num_steps, expected reject_reason, expected error_step, expected intervention)
    ('{"verification": "Step 2 adds wrong.", "error_step": 2, "intervention": "I add 3 + 4 = 7 carefully."}', 4,
     None, 2, "I add 3 + 4 = 7 carefully."),
    ("Checking...\n<error_step>2</error_step>\n<intervention>I recompute 3 + 4 carefully.</intervention>", 4, None, 2,
     "I recompute 3 + 4 carefully."),
    ("<error_step>Substep 2</error_step><intervention>Let me redo the sum.</intervention>", 4, None, 2,
     "Let me redo the sum."),
    ("<error_step>**Step 3**</error_step>\n<intervention>Fix it now.</intervention>", 4, None, 3, "Fix it now."),
    ("<error_step>the second substep</error_step><intervention>Redo the addition.</intervention>", 4, None, 2,
     "Redo the addition."),
    ("<error_step>two</error_step><intervention>Redo the addition.</intervention>", 4, None, 2, "Redo the addition."),
    ("<ERROR_STEP> 2. </ERROR_STEP>\n<INTERVENTION>\n  Redo it.  \n</INTERVENTION>", 4, None, 2, "Redo it."),
    # the last well-formed block wins
    ("<error_step>1</error_step><intervention>First try.</intervention> on reflection "
     "<error_step>2</error_step><intervention>Second try.</intervention>", 4, None, 2, "Second try."),
    ("<error_step>2</error_step><intervention>Good one.</intervention> and then a broken "
     "<error_step>9</error_step><intervention>bad</intervention>", 4, None, 2, "Good one."),
    ('Draft: {"error_step": 1, "intervention": "a"} Final: {"error_step": 3, "intervention": "Subtract 2 from 7."}', 4,
     None, 3, "Subtract 2 from 7."),
    ('```json\n{"verification": "ok", "error_step": "Substep 2", "intervention": "Use 7 here."}\n```', 4, None, 2,
     "Use 7 here."),
    ('{"error_step": 2.0, "intervention": "Float step number."}', 4, None, 2, "Float step number."),
    # the step comes after the intervention
    ("<intervention>Recount the apples.</intervention>\n<error_step>2</error_step>", 4, None, 2, "Recount the apples."),
    # the attempt's own "Step N" heading is not the location when a Substep is named too
    ("<error_step>In the student's Step 1 (Substep 3)</error_step><intervention>Subtract again.</intervention>", 4,
     None, 3, "Subtract again."),
    # rejections, each with its reason
    ("The attempt looks fine to me.", 4, propose.NO_BLOCK, None, None),
    ("", 4, propose.NO_BLOCK, None, None),
    ('{"verification": "truncated mid-str', 4, propose.NO_BLOCK, None, None),
    ("<error_step>7</error_step><intervention>Out of range.</intervention>", 4, propose.BAD_LOCATION, None,
     "Out of range."),
    ("<error_step>somewhere</error_step><intervention>Vague.</intervention>", 4, propose.BAD_LOCATION, None, "Vague."),
    ("<error_step>2</error_step>", 4, propose.EMPTY, 2, None),
    ("<error_step>2</error_step><intervention>   </intervention>", 4, propose.EMPTY, 2, ""),
    ("<error_step>2</error_step><intervention>the replacement step</intervention>", 4, propose.EMPTY, 2,
     "the replacement step"),
    ("<error_step>2</error_step><intervention>...</intervention>", 4, propose.EMPTY, 2, "..."),
    # what the prompts show in place of the step, copied by SmolLM2-135M
    ('{"verification": "the verification log and the issues found", "draft": "the draft and its Substep number", '
     '"self_check": "the three questions answered", "error_step": 2, "intervention": "the final step"}', 4,
     propose.EMPTY, 2, "the final step"),
    ("<error_step>2</error_step><intervention>the final intervention step</intervention>", 4, propose.EMPTY, 2,
     "the final intervention step"),
    ("<error_step>None</error_step><intervention>n/a</intervention>", 4, propose.NO_ERROR_FOUND, None, "n/a"),
    ("<error_step>No error</error_step><intervention>Nothing to fix.</intervention>", 4, propose.NO_ERROR_FOUND, None,
     "Nothing to fix."),
    ('{"error_step": -1, "intervention": "none"}', 4, propose.NO_ERROR_FOUND, None, "none"),
    ('{"error_step": 0, "intervention": "x"}', 4, propose.NO_ERROR_FOUND, None, "x"),
    ('{"error_step": true, "intervention": "Bool is not a step."}', 4, propose.BAD_LOCATION, None,
     "Bool is not a step."),
]


@pytest.mark.parametrize("reply, num_steps, reason, step, intervention", CORPUS)
def test_parse_corpus(reply: str, num_steps: int, reason: str | None, step: int | None,
                      intervention: str | None) -> None:
    parsed = propose.parse_proposal(reply, num_steps)
    assert (parsed.reject_reason, parsed.error_step, parsed.intervention) == (reason, step, intervention)


SMOLLM2 = [json.loads(line)
           for line in (Path(__file__).parent / "data/smollm2_proposals.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", SMOLLM2, ids=[f"smollm2-{i}" for i in range(len(SMOLLM2))])
def test_parse_real_smollm2_outputs(case: dict) -> None:
    parsed = propose.parse_proposal(case["text"], case["num_steps"])
    expected = case["expected"]
    assert (parsed.reject_reason, parsed.error_step, parsed.intervention) == (
        expected["reject_reason"], expected["error_step"], expected["intervention"]
    )


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) + len(SMOLLM2) >= 30


@pytest.mark.parametrize(
    "raw, expected",
    [(3, 3), ("3", 3), ("Substep 3", 3), ("step #3", 3), ("(3)", 3), ("3.", 3), ("three", 3), ("the third one", 3),
     ("3rd", 3), ("the 5th substep", 5), ("2nd", 2), ("Step 12", 12),
     # Qwen3-4B-Instruct heads its steps "### Step N": an explicit Substep wins wherever it stands
     ("In the student's Step 5 (Substep 7)", 7), ("Step 2, Substep 9", 9), ("Substep 4 (inside ### Step 2)", 4),
     ("**Substep 11:** the sign error in Step 3", 11), ("sub-step 6", 6), ("SubStep 8", 8),
     ("none", "none"), ("-1", "none"), ("No error; step 3 is fine", "none"), ("There is no critical error", "none"),
     ("All steps are correct", "none"), (None, None), ("", None), ("many", None), (True, None)],
)
def test_normalize_step(raw: object, expected: object) -> None:
    assert propose.normalize_step(raw) == expected


@pytest.mark.parametrize(
    "reply, reason",
    [
        ('{"verification": "verification", "error_step": 1, "intervention": "verification"}', propose.ECHO),
        ('{"verification": "x", "error_step": 1, "intervention": "intervention"}', propose.ECHO),
        ('{"verification": "x", "error_step": 2, "intervention": "error_step"}', propose.ECHO),
        ('{"verification": "x", "error_step": 2, "intervention": "self_check"}', propose.ECHO),
        ('{"verification": "The last one", "error_step": 2, "intervention": "The last one"}', propose.ECHO),
        ('{"verification": "v", "self_check": "All three answers are No.", "error_step": 2, '
         '"intervention": "All three answers are No."}', propose.ECHO),
        ('{"verification": "x", "error_step": 2, '  # one of the attempt's own steps, verbatim
         '"intervention": "Tom starts with 3 apples and buys 4 more, so 3 + 4 = 8."}', propose.ECHO),
        ('{"verification": "x", "error_step": 2, "intervention": "I add 3 + 4 carefully and get seven."}', None),
        # the final intervention is its draft, once the draft passed the self-check: no echo
        ('{"verification": "v", "draft": "I add 3 + 4 carefully and get seven.", "self_check": "No, No, No.", '
         '"error_step": 2, "intervention": "I add 3 + 4 carefully and get seven."}', None),
    ],
)
def test_echoes_are_rejected(reply: str, reason: str | None) -> None:
    assert propose.parse_proposal(reply, len(STEPS), STEPS).reject_reason == reason


@pytest.mark.parametrize(
    "intervention, echo",
    [
        # what SmolLM2-135M wrote in the embedded demo's JSON replies, copied from the prompt's field descriptions
        ("the final step, or", True),
        ("the final step completed", True),
        ("The final step of the intervention", True),  # nothing but the prompt's words
        ("the draft and its Substep number", True),
        ("The three questions answered", True),
        ("the verification log and the issues found", True),
        ("Check every intermediate result", True),  # the prompt's own advice, not a step
        # real steps, even ones using a word or phrase of the prompt
        ("Let me recheck the final step: $3 + 4 = 7$, not 8, so I redo the subtraction.", False),
        ("I should list the cases by their smaller element instead of guessing.", False),
        ("Instead, count the complements: $2^{10} - 1$ subsets are non-empty.", False),
        ("I add 3 + 4 carefully and get seven.", False),
        ("Wait, the student's step is right; I check the next intermediate result instead.", False),
    ],
)
def test_an_intervention_made_of_the_prompts_own_words_is_an_echo(intervention: str, echo: bool) -> None:
    settings = propose.ProposeSettings(3, Sampling(max_tokens=64), load_prompt("propose_single.md"))
    reply = json.dumps({"verification": "v", "draft": "d", "self_check": "c", "error_step": 2,
                        "intervention": intervention})
    parsed = propose.parse_proposal(reply, len(STEPS), STEPS, propose.instructions(settings))
    assert (parsed.reject_reason == propose.ECHO) is echo, parsed
    assert propose.parse_proposal(reply, len(STEPS), STEPS).reject_reason != propose.ECHO or echo  # needs the prompt


# --- degenerate interventions -----------------------------------------------------------------------

@pytest.mark.parametrize(
    "intervention, degenerate",
    [
        # what the embedded demo (SmolLM2-135M) kept, and their kin
        ("1", True), ("0", True), ("112", True), ("test_replication", True), ("-3.5", True), ("1,000", True),
        ("42%", True), ("$12$", True), ("**7**", True),
        ("error", True), ("Hello", True), ("Recount.", True), ("Wait...", True), ("x", True), ("Substep", True),
        ("INSERT_STEP_CONTENT", True), ("my-answer", True),
        # JSON and markup fragments
        ('{"content": "I recount the apples."}', True), ('"error_step": 2', True), ("'location': 3", True),
        ('I say "seven", not "eight": $3 + 4 = 7$.', False), ("</intervention>", True),
        ("<br/>", True), ("```json", True), ("<p></p>", True),
        # no words at all
        ("$x^2-5x+6=(x-2)(x-3)$", True), ("$$3 + 4 = 7$$", True), ("\\frac{1}{2}", True), ("(3, 4)", True),
        ("$\\sqrt{2} \\cdot \\pi$", True),
        # short real steps, mostly-math ones included
        ("I factor $x^2-5x+6=(x-2)(x-3)$ first.", False), ("Redo it.", False), ("Let me recount: 3 + 4 = 7.", False),
        ("Use $\\gcd(a, b) = 1$ here.", False), ("Check $n = 2$ separately.", False),
        ("Wait, $2 + 3 = 5$, not 6.", False), ("So $x \\ne 0$; divide by $x$.", False),
        ("By AM-GM, $a + b \\ge 2\\sqrt{ab}$.", False), ("Écrivons $n = 2k$ et comparons.", False),
        ("我们先因式分解 $x^2-1$。", False), ("Factor: $x^2-1=(x-1)(x+1)$.", False),
        ("I try $k = 1, 2, 3$ and look for a pattern in $k^2 + 11 \\bmod (k+1)$.", False),
    ],
)
def test_degenerate_interventions(intervention: str, degenerate: bool) -> None:
    assert propose.is_degenerate(intervention) is degenerate
    reply = json.dumps({"verification": "Substep 2 is wrong.", "draft": "", "self_check": "", "error_step": 2,
                        "intervention": intervention})
    assert propose.parse_proposal(reply, 4, STEPS).reject_reason == (propose.DEGENERATE if degenerate else None)


# --- LaTeX inside JSON replies ------------------------------------------------------------------------
# Each reply as a schema-constrained engine (or a model writing JSON freely) emits it: one backslash per command.

ESCAPES = [
    # JSON escapes that are LaTeX commands: \f form feed, \t tab, \b backspace, \n newline, \r carriage return
    (r'{"error_step": 2, "intervention": "I rewrite $\frac{1}{2} \times 4$ before adding."}',
     "I rewrite $\\frac{1}{2} \\times 4$ before adding."),
    (r'{"error_step": 2, "intervention": "With $\theta = \beta$ the angles match, so I use $\tan\theta$."}',
     "With $\\theta = \\beta$ the angles match, so I use $\\tan\\theta$."),
    (r'{"error_step": 2, "intervention": "I note $a \neq b$, take $\nabla f$ and keep $\nu$ fixed."}',
     "I note $a \\neq b$, take $\\nabla f$ and keep $\\nu$ fixed."),
    (r'{"error_step": 2, "intervention": "Using $\rho$ and $\left( x + 1 \right)^2$ I expand the square."}',
     "Using $\\rho$ and $\\left( x + 1 \\right)^2$ I expand the square."),
    (r'{"error_step": 2, "intervention": "I write $\binom{5}{2}$ and $\bar{x}$, then $\begin{cases} x \end{cases}$."}',
     "I write $\\binom{5}{2}$ and $\\bar{x}$, then $\\begin{cases} x \\end{cases}$."),
    (r'{"error_step": 2, "intervention": "For $x \to \infty$ I compare $\text{deg}$ and use $\forall n$."}',
     "For $x \\to \\infty$ I compare $\\text{deg}$ and use $\\forall n$."),
    (r'{"error_step": 2, "intervention": "I see $n \notin S$, $3 \nmid n$, $\langle v \rangle$, $\lfloor x \rfloor$."}',
     "I see $n \\notin S$, $3 \\nmid n$, $\\langle v \\rangle$, $\\lfloor x \\rfloor$."),
    # invalid JSON escapes: \s \c \a \l \p, and \u not followed by four hex digits
    (r'{"error_step": 2, "intervention": "So $\sqrt{2} \cdot \alpha \le \pi$ holds for every $\alpha$."}',
     "So $\\sqrt{2} \\cdot \\alpha \\le \\pi$ holds for every $\\alpha$."),
    (r'{"error_step": 2, "intervention": "I mark the $\underline{last}$ digit and take $\uparrow$ moves."}',
     "I mark the $\\underline{last}$ digit and take $\\uparrow$ moves."),
    # real escapes stay what they are
    (r'{"error_step": 2, "intervention": "First I add.\n\nNext we subtract the 2 apples."}',
     "First I add.\n\nNext we subtract the 2 apples."),
    (r'{"error_step": 2, "intervention": "As $\theta \neq 0$,\nwe divide by $\theta$, then\nand only then simplify."}',
     "As $\\theta \\neq 0$,\nwe divide by $\\theta$, then\nand only then simplify."),
    (r'{"error_step": 2, "intervention": "Escaped right: $\\frac{a}{b}$ and $\\sqrt{3}$ and a line break \\\\ here."}',
     "Escaped right: $\\frac{a}{b}$ and $\\sqrt{3}$ and a line break \\\\ here."),
    (r'{"error_step": 2, "intervention": "The \"key\" step: $x^2 \u2265 0$ and 5\u00b0 is small."}',
     'The "key" step: $x^2 ≥ 0$ and 5° is small.'),
    # control characters never reach the stored text: CR, CRLF, tabs, a bell, a lone surrogate
    (r'{"error_step": 2, "intervention": "Line one\r\nline two\rline three\tand\t\tTabs, \ttwo\t$\tfrac12$."}',
     "Line one\nline two\nline three and  Tabs,  two $\\tfrac12$."),
    (r'{"error_step": 2, "intervention": "A bell\u0007 and a lone \ud83d surrogate, a real \ud83d\ude00 pair."}',
     "A bell and a lone \ufffd surrogate, a real \U0001f600 pair."),
    # free-text tags are raw text: LaTeX as written, control characters cleaned
    ("<error_step>2</error_step><intervention>I use $\\frac{1}{2}$\twith a tab\r\nand a CRLF.</intervention>",
     "I use $\\frac{1}{2}$ with a tab\nand a CRLF."),
]


@pytest.mark.parametrize("reply, intervention", ESCAPES)
def test_latex_with_one_backslash_survives_a_json_reply(reply: str, intervention: str) -> None:
    parsed = propose.parse_proposal(reply, 4, STEPS)
    assert (parsed.reject_reason, parsed.error_step, parsed.intervention) == (None, 2, intervention)


def test_no_control_character_reaches_a_stored_row() -> None:
    reply = (r'{"verification": "Substep 2: \"3 + 4 = 8\" is wrong; $\frac{3}{1}\times\beta$\r\n\tchecked.", '
             r'"draft": "I add $3 \cdot 1 + 4$ again.\f", "self_check": "Q1 No\tQ2 No\bQ3 No", "error_step": 2, '
             r'"intervention": "I add again: $3 + 4 = 7$, so $\text{total} \neq 8$.\r\nThen\tI subtract."}')
    row = propose.read_reply(propose.proposal_row({"problem_id": "p", "attempt_id": "p/a0"}, STEPS, 0),
                             Completion(reply, "stop"), STEPS)
    assert row["reject_reason"] is None
    assert row["intervention"] == "I add again: $3 + 4 = 7$, so $\\text{total} \\neq 8$.\nThen I subtract."
    assert row["intervened_text"] == STEPS[0] + row["intervention"]
    assert "$\\frac{3}{1}\\times\\beta$" in row["verification"] and "Q1 No Q2 No\\bQ3 No" in row["verification"]
    assert all(no_control(row[key]) for key in ("intervention", "verification", "intervened_text"))


# --- the release's block --------------------------------------------------------------------------------

RELEASE = [
    # (reply, num_steps, expected reject_reason, expected error_step, expected intervention)
    ('<intervention>\n{ "content": "I should recount: 3 + 4 is seven.", "location": 2 }\n</intervention>', 4, None, 2,
     "I should recount: 3 + 4 is seven."),
    ('<intervention>\n{{ "content": "I should recount: 3 + 4 is seven.", "location": 2 }}\n</intervention>', 4, None, 2,
     "I should recount: 3 + 4 is seven."),
    ("<intervention>{'content': 'Let me recheck the student's sum: 3 + 4 is seven.', 'location': 2}</intervention>",
     4, None, 2, "Let me recheck the student's sum: 3 + 4 is seven."),
    ("<intervention>{'content': 'I don\\'t trust $3 + 4 = 8$; I add again.', 'location': '2'}</intervention>", 4, None,
     2, "I don't trust $3 + 4 = 8$; I add again."),
    ('<intervention>{"content": "I add again before subtracting.", "location": "Substep 3"}</intervention>', 4, None, 3,
     "I add again before subtracting."),
    ('<intervention>{"content": "I add again before subtracting.", "location": Substep 3}</intervention>', 4, None, 3,
     "I add again before subtracting."),
    ('<intervention>{"content": "I add again before subtracting.", "location": "5"}</intervention>', 6, None, 5,
     "I add again before subtracting."),
    # LaTeX with one backslash, invalid and valid escapes alike
    (r'<intervention>{"content": "I use $\sqrt{16} = 4$ and $\frac{3+4}{1}$ to check.", "location": 2}</intervention>',
     4, None, 2, "I use $\\sqrt{16} = 4$ and $\\frac{3+4}{1}$ to check."),
    # triple quotes, unescaped inner quotes
    ('<intervention>{"content": """I say "seven", not "eight": $3 + 4 = 7$.""", "location": 2}</intervention>', 4, None,
     2, 'I say "seven", not "eight": $3 + 4 = 7$.'),
    ('<intervention>{"content": "I redo the "sum" step carefully.", "location": 2}</intervention>', 4, None, 2,
     'I redo the "sum" step carefully.'),
    # indented over several lines, as the release's prompt shows it
    ('**Final intervention step**\n\n<intervention>\n    {\n        "content": "I recount the apples one by one.",\n'
     '        "location": 2\n    }\n</intervention>', 4, None, 2, "I recount the apples one by one."),
    # a draft block, then the final one: the last wins
    ('<intervention>{"content": "Draft: the answer is near 5.", "location": 4}</intervention>\nSelf-check: Q3 Yes, '
     'revise.\n<intervention>{"content": "I add 3 and 4 again.", "location": 2}</intervention>', 4, None, 2,
     "I add 3 and 4 again."),
    # the release's "no critical error": an empty content, whatever the location
    ('<intervention>\n{ "content": "", "location": 0 }\n</intervention>', 4, propose.NO_ERROR_FOUND, None, ""),
    ('<intervention>{"content": "", "location": 3}</intervention>', 4, propose.NO_ERROR_FOUND, None, ""),
    # rejections
    ('<intervention>{"content": "I add again.", "location": 9}</intervention>', 4, propose.BAD_LOCATION, None,
     "I add again."),
    ('<intervention>{ "content": INSERT_STEP_CONTENT, "location": INSERT_STEP_NUMBER }</intervention>', 4,
     propose.BAD_LOCATION, None, "INSERT_STEP_CONTENT"),
    ('<intervention>{ "content": "INSERT_STEP_CONTENT", "location": 2 }</intervention>', 4, propose.DEGENERATE, 2,
     "INSERT_STEP_CONTENT"),
    ('<intervention>{"content": "I add again.", "loc', 4, propose.NO_BLOCK, None, None),
]


@pytest.mark.parametrize("reply, num_steps, reason, step, intervention", RELEASE)
def test_the_release_block_is_read(reply: str, num_steps: int, reason: str | None, step: int | None,
                                   intervention: str | None) -> None:
    parsed = propose.parse_proposal(reply, num_steps)
    assert (parsed.reject_reason, parsed.error_step, parsed.intervention) == (reason, step, intervention)


def test_model_text_never_reaches_eval() -> None:
    source = (Path(propose.__file__)).read_text()
    assert not any(f"{name}(" in source for name in ("eval", "literal_eval", "exec", "pickle.load"))
    parsed = propose.parse_proposal('<intervention>{"content": __import__("os").system("true"), "location": 2}'
                                    "</intervention>", 4)
    assert parsed.intervention == '__import__("os").system("true")'  # read as text, never run


# --- the answer-leak test -------------------------------------------------------------------------------
ABC = "Let $a, b, c$ be positive integers with $abc = 1000$. Find the minimum possible value of $a+b+c$."
DICE = "Two fair dice are rolled. What is the probability that the sum of the numbers shown is a prime greater than 5?"
MOD = "Find the remainder when $3^{100}$ is divided by $7$."
SQUARE = "A square has a diagonal of length $4$. Find its perimeter."
H = "Let $h(x) = x^2 + 3x + 2$. Compute $h(3)$."
K = "Find all positive integers $k$ such that $k + 1$ divides $k^2 + 11$ and $k > 3$."
COIN = "Alice and Bob flip a fair coin in turns, Alice first, until the first head. What is the probability Bob wins?"
ROOTS = "Find the sum of the roots of $2x^2 - 14x + 3 = 0$."
AB = "Real numbers $a$ and $b$ satisfy $a^2 + b^2 = 25$ and $ab = 12$ with $a, b > 0$. Find $a+b$."
BOARD = "What is the largest number of rooks on a $10 \\times 10$ board such that each attacks at most one other?"
N20 = "Find the largest integer $n \\le 20$ such that $n^2 + 1$ is divisible by $5$ and $n$ is odd."
FACT = "How many ways can the letters of the word LEVEL be arranged?"
TRI = "In triangle $ABC$, $AB = AC$ and $\\angle BAC = 90^\\circ$. Find $\\angle ABC$ in degrees."
DIST = "Find the distance between the points $(1, 2)$ and $(4, 5)$."
ODD = "For which positive integers $n$ is $n^2 + n + 1$ not divisible by $2$?"
PAIR = "Find the ordered pair $(a, b)$ of positive integers with $a < b$ and $a^2 + b^2 = 25$."
XSOL = "Solve $2x + 9 = 3$ for $x$."
PROD = "Compute $25 \\times 40$ without a calculator."
SEQ = "The sequence $a_n$ satisfies $a_1 = 1$ and $a_{n+1} = a_n + 2n$. Find $a_{12}$."
CUBE = "Find the number of positive divisors of $2^4 \\cdot 3^2$."
CASES = "How many integers $n$ with $1 \\le n \\le 100$ are divisible by $4$ but not by $6$?"

LEAKS = [
    # (problem, gold, intervention, leaks): judged by the whole check, token test and math equivalence together
    # stated in the phrasings the old test missed
    (ABC, "30",
     "Taking the balanced choice, we get $a+b+c = 30$, and I still have to show no triple does better.", True),
    (DICE, "\\frac{2}{9}",
     "Counting the ordered outcomes again, 8 of the 36 work, so the probability is $\\frac{2}{9}$.", True),
    (MOD, "4", "Since $3^6 \\equiv 1 \\pmod 7$, I reduce $100 = 6 \\cdot 16 + 4$, so the remainder is 4.", True),
    (SQUARE, "8\\sqrt{2}", "The side is $4/\\sqrt{2} = 2\\sqrt{2}$, so the perimeter is $8\\sqrt{2}$, not 16.", True),
    (CASES, "17", "I double counted the multiples of 12. Removing them, the correct total is 17.", True),
    (H, "20", "I plug in again term by term: $h(3) = 9 + 9 + 2$, so $h(3) = 20$.", True),
    (K, "5", "I test each divisor of 12 as a value of $k+1$; only $k = 5$ works, so I verify it directly.", True),
    # boxes, answer phrases, conclusions
    (ABC, "30", "So the answer is $\\boxed{30}$.", True),
    (FACT, "30", "The answer should be 30 arrangements once I divide by the repeated letters.", True),
    (COIN, "\\frac{1}{3}",
     "Summing the geometric series $\\frac14 + \\frac1{16} + \\cdots$, Bob's chance equals 0.333333...", True),
    (COIN, "\\frac{1}{3}", "Summing the geometric series, Bob's probability turns out to be $\\frac{1}{3}$.", True),
    (COIN, "\\frac{1}{3}",
     "Summing $\\frac14 + \\frac1{16} + \\cdots$ I get $1/3$ for Bob, so I recheck Alice's share.", True),
    (PROD, "1000", "We compute $25 \\times 40 = 1,000$ directly.", True),
    (PAIR, "(3,4)", "Checking the squares below 25, $(a, b) = (3, 4)$ is the only pair.", True),
    (SEQ, "133", "Summing the differences, $a_{12} = 1 + 2(1 + 2 + \\cdots + 11) = 133$.", True),
    (XSOL, "-3", "Subtracting 9 from both sides gives $2x = -6$, which gives $x = -3$.", True),
    (ROOTS, "7", "By Vieta the sum of the roots comes to $-\\frac{b}{a} = 7$; I use that instead.", True),
    (AB, "7", "Since $(a+b)^2 = 25 + 24 = 49$ and both are positive, $a+b = 7$ follows.", True),
    (TRI, "45", "The base angles are equal, so $\\angle ABC = 45^\\circ$.", True),
    (DIST, "3\\sqrt{2}", "By the distance formula the distance is $\\sqrt{9 + 9} = \\sqrt{18}$.", True),
    (FACT, "30", "There are $\\frac{5!}{2!\\,2!} = 30$ arrangements.", True),
    (CUBE, "15", "The number of divisors is $(4+1)(2+1)$, which gives 15.", True),
    (MOD, "4", "So $3^{100} \\equiv 4 \\pmod{7}$, and that is the remainder.", True),
    (ODD, "all positive integers",
     "So the answer is all positive integers, since $n^2 + n = n(n+1)$ is always even.", True),
    (COIN, "\\frac{1}{3}", "Thus the maximum possible value of Bob's share is $\\frac{1}{3}$.", True),
    (CASES, "17", "Therefore there are 17 such integers, which I should double check by listing.", True),
    (DICE, "\\frac{2}{9}", "So $P = 8/36 = 2/9$, and I move on to the next part.", True),
    (SEQ, "133", "So the 12th term is 133.", True),
    (XSOL, "-3", "Rearranging, the solution is $x=-3$.", True),
    (COIN, "\\frac{1}{3}",
     "The probability for Bob is one half of Alice's, i.e. it should be 0.5 of hers, and it is $1/3$.", True),
    (PROD, "1000", "Grouping as $25 \\times 4 \\times 10$ the product is $10^3$.", True),
    (FACT, "30", "Dividing $5! = 120$ by $2!\\cdot 2! = 4$ leaves 30 distinct words.", True),
    # intermediate facts, choices, exponents, indices, other numbers: no leak
    (ABC, "30",
     "I should not assume $a = b = c$; instead I list the factorizations of $1000 = 2^3 \\cdot 5^3$.", False),
    (ABC, "30", "We have 130 as the sum for $(1, 10, 100)$, which is far from optimal.", False),
    (ABC, "30", "The factor $2^{30}$ never appears, so I only use the exponents of $2^3 \\cdot 5^3$.", False),
    (DICE, "\\frac{2}{9}",
     "I must count ordered pairs: list all 36 outcomes and mark those whose sum is prime.", False),
    (MOD, "4", "Instead of multiplying out, I use Fermat: $3^6 \\equiv 1 \\pmod 7$, then reduce the exponent.", False),
    (SQUARE, "8\\sqrt{2}", "The side is $2\\sqrt{2}$, so I add up four sides instead of doubling the diagonal.", False),
    (SQUARE, "8\\sqrt{2}", "I need the side $s$ with $s\\sqrt{2} = 4$; then the perimeter is four times it.", False),
    (CASES, "17", "I double counted the pair (3, 5); I should list the pairs by their smaller element.", False),
    (H, "20", "I recompute $h(3)$ by substituting $x = 3$ into each term separately.", False),
    (K, "5", "Instead, I test each divisor of 12 as a candidate for $k+1$.", False),
    (K, "5", "Checking the divisors of 12 one by one results in $k = 5$ as the only one.", True),
    (K, "5", "Set $k = 1$ first to see the pattern, then write $k^2 + 11 = (k+1)(k-1) + 12$.", False),
    (FACT, "30", "I think the total is larger than 20, so I check the cases above 20 again.", False),
    (PROD, "1000", "I should compute $25 \\times 4 = 100$ first and then scale by ten.", False),
    (PAIR, "(3,4)", "Try small values: $(a, b) = (1, 2)$ fails, so move on.", False),
    (XSOL, "-3", "Subtracting: $2x - 3$ stays as it is, and I solve $2x + 6 = 0$ next.", False),
    (XSOL, "-3", "I move the 9 to the other side, so the right side becomes $3 - 9$.", False),
    (FACT, "30", "I must divide by $2!$ for each of the two repeated letters before counting.", False),
    (COIN, "\\frac{1}{3}",
     "The turns are not symmetric, so I compute Alice's chance first and subtract it from 1.", False),
    (CUBE, "15", "Note $2^4$ appears, so the exponent of 2 can be $0, 1, 2, 3$ or $4$.", False),
    (CUBE, "15", "Each divisor is $2^i 3^j$ with $0 \\le i \\le 4$ and $0 \\le j \\le 2$; I count the choices.", False),
    (N20, "19", "I should start testing from $n = 20$ downwards and stop at the first that works.", False),
    (N20, "19", "Only odd $n$ count, so $n^2 + 1$ must be even; I look at $n^2 \\bmod 5$ instead.", False),
    (BOARD, "15", "I colour the $10 \\times 10$ board in rows and count how many rooks each row can hold.", False),
    (SEQ, "133", "The index $a_{12}$ needs the sum $1 + 2 + \\cdots + 11$, which I compute with Gauss's trick.", False),
    (SEQ, "133", "I write $a_{n+1} - a_n = 2n$ and add these differences for $n = 1$ to $11$.", False),
    (ROOTS, "7", "I divide the equation by 2 so the leading coefficient is 1, and I recall Vieta's formulas.", False),
    (ROOTS, "7",
     "Let me set $y = x^2$ only if the equation were quartic; here $x^2 - 7x + \\frac32 = 0$ is simpler.", False),
    (AB, "7", "I should use $(a+b)^2 = a^2 + 2ab + b^2$ rather than guessing $a$ and $b$.", False),
    (TRI, "45", "In an isosceles right triangle the two base angles are equal and add up to $90^\\circ$.", False),
    (DIST, "3\\sqrt{2}", "I use the distance formula with $\\Delta x = 3$ and $\\Delta y = 3$.", False),
    (MOD, "4", "The powers of 3 repeat with period 6 modulo 7, so I only need $100 \\bmod 6$.", False),
    (ODD, "all positive integers",
     "I factor $n^2 + n = n(n+1)$ and note one of two consecutive integers is even.", False),
    (DICE, "\\frac{2}{9}", "Note that $f(1) = 0$, so I start from the smallest sum instead.", False),
    # one-character golds are everywhere: only a stated value counts, never a square or a coefficient
    (ROOTS, "2", "I square both sides: $(x+1)^2 = x^2 + 2x + 1$, and compare coefficients.", False),
    (ROOTS, "0", "I factor $x^2 - 5x + 6 = 0$ as $(x-2)(x-3) = 0$ and read off both roots.", False),
    (ROOTS, "1", "Set $x = 1$ and substitute back into the equation to test it.", False),
    (ROOTS, "2", "Let me set $y = x^2$ so the equation becomes a quadratic in $y$.", False),
    (ROOTS, "0", "Note that $f(1) = 0$, so 1 is a root of the cubic.", True),  # a stated value, like h(3) = 20
    (CUBE, "2", "Therefore $n = 2$ is the only prime that divides both.", True),
    (ABC, "30", "Since $a+b=7$ would be too small, I should rewrite the product using $a$ and $b$.", False),
]


def run_leak_test(rows: list[dict], problems: dict[str, dict]) -> None:
    run_by_hand(propose.check_leaks(rows, problems), grade_now)


def leak_row(n: int, intervention: str, raw: str | None = None) -> dict:
    return {"problem_id": str(n), "intervention": intervention, "raw": raw, "reject_reason": None,
            "intervened_text": "prefix", "accepted": False, "error": None}


def test_leak_table_is_large_and_balanced() -> None:
    leaks = sum(leak for *_, leak in LEAKS)
    assert len(LEAKS) >= 60 and 0.4 <= leaks / len(LEAKS) <= 0.6


@pytest.mark.parametrize("problem, gold, intervention, leaks", LEAKS, ids=[f"leak-{n}" for n in range(len(LEAKS))])
def test_leak_test_judges_every_case_right(problem: str, gold: str, intervention: str, leaks: bool) -> None:
    row = leak_row(0, intervention)
    run_leak_test([row], {"0": {"problem": problem, "answer": gold}})
    assert (row["reject_reason"] == propose.LEAKS_ANSWER) is leaks, propose.leak_candidates(intervention, problem)
    assert row["accepted"] is not leaks and (row["intervened_text"] is None) is leaks


@pytest.mark.parametrize(
    "text, gold, problem, stands",
    [
        ("We have 17 apples.", "17", "", True), ("We have 117 apples.", "17", "", False),
        ("so $x^{17}$ dominates", "17", "", False), ("the term $a_{17}$ and $a_17$", "17", "", False),
        ("I get $17x + 3$", "17", "", False), ("take $1/17$ of them", "17", "", False),
        ("about 17.5 percent", "17", "", False), ("17,000 people", "17", "", False),
        ("so $17 + 4 = 21$", "17", "", False), ("then $21 - 17$", "17", "", False), ("a 17-gon", "17", "", False),
        ("it is $-17$", "17", "", False), ("it is $-17$", "-17", "", True), ("look at $x - 17$", "-17", "", False),
        ("the angle is $17^\\circ$", "17", "", True), ("then $17^2$", "17", "", False),
        ("$\\frac{17}{3}$ of it", "17", "", False), ("$17\\sqrt{3}$ long", "17", "", False),
        ("it is $2\\sqrt{3}$", "\\sqrt{3}", "", False), ("so we need $\\sqrt{3}$", "\\sqrt{3}", "", True),
        ("so it is $\\dfrac{2}{9}$", "\\frac{2}{9}", "", True), ("the pair $\\left(1, 2\\right)$", "(1,2)", "", True),
        ("we get $a+b+c=30$", "30", "", True),
        # single characters, bare LaTeX symbols and words stand everywhere: not tested this way
        ("x^2 and 2x", "2", "", False), ("use $\\pi r^2$", "\\pi", "", False), ("No, that is wrong.", "No", "", False),
        # a number the problem itself uses
        ("start from $n = 20$ downwards", "20", "Find the largest $n \\le 20$ with...", False),
        ("start from $n = 20$ downwards", "20", "Find the largest $n < 30$ with...", True),
    ],
)
def test_the_gold_as_a_standalone_token(text: str, gold: str, problem: str, stands: bool) -> None:
    assert propose.states_gold(text, gold, problem) is stands


def test_the_leak_test_reads_the_intervention_as_written_in_the_reply() -> None:
    # over-escaped: `\\\\\\boxed` decodes to `\\\\boxed`, which is no box; the reply itself still shows one
    raw = r'{"verification": "v", "error_step": 2, "intervention": "I finish with \\\boxed{7} after checking."}'
    parsed = propose.parse_proposal(raw, 4)
    assert parsed.intervention == "I finish with \\\\boxed{7} after checking." and parsed.reject_reason is None
    assert propose.leak_candidates(parsed.intervention) == []
    row = leak_row(0, parsed.intervention, raw)
    run_leak_test([row], {"0": {"problem": "Tom has 3 apples and buys 4. How many?", "answer": "7"}})
    assert row["reject_reason"] == propose.LEAKS_ANSWER


def test_an_undecided_leak_test_is_retried_not_accepted() -> None:
    from intgen.grading import Verdict

    row = leak_row(0, "So the answer is $\\boxed{7}$.")
    run_by_hand(propose.check_leaks([row], {"0": {"problem": "P", "answer": "7"}}),
                lambda ask: [Verdict(None, None, "timeout")] * len(ask.items))
    assert row["reject_reason"] == propose.LEAK_TEST_FAILED and row["error"].startswith("grade_timeout")


# --- which attempts get proposals -------------------------------------------------------------------------

ATTEMPTS = [
    # (correct, grade_reason, truncated, text, error, for "not-correct", for "incorrect")
    (True, "math", False, ATTEMPT, None, False, False),
    (False, "math", False, ATTEMPT, None, True, True),
    (False, "text", False, ATTEMPT, None, True, True),
    (None, "truncated", True, ATTEMPT, None, True, False),  # cut at max_tokens: the release proposes for it
    (None, "no_answer", False, ATTEMPT, None, True, False),  # unboxed
    (None, "parse_error", False, ATTEMPT, None, True, False),
    (None, "no_gold", False, ATTEMPT, None, True, False),
    (None, "sample_error", False, None, "http_503: down", False, False),  # nothing to critique
    (None, "sample_error", False, "partial text", "http_500: reset", False, False),
    (None, "prompt_too_long", False, "", None, False, False),
]


def attempts_part(attempts: list[dict]) -> Part:
    problem = {"problem_id": "p", "problem": "Tom has 3 apples and buys 4. He gives 2 away. How many?", "answer": "5",
               "solution": "3 + 4 - 2 = 5."}
    return Part(0, {"graded": attempts, "problems": [problem], "pass_rates": [{"problem_id": "p", "selected": True}]})


@pytest.mark.parametrize("case", ATTEMPTS, ids=[f"{c[0]}-{c[1]}" for c in ATTEMPTS])
def test_which_attempts_get_proposals(case: tuple) -> None:
    correct, reason, truncated, text, error, not_correct, incorrect = case
    attempt = {"problem_id": "p", "attempt_id": "p/a0", "text": text, "correct": correct, "grade_reason": reason,
               "truncated": truncated, "error": error}
    assert propose.wants_proposals(attempt, "not-correct") is not_correct
    assert propose.wants_proposals(attempt, "incorrect") is incorrect
    for propose_for, wanted in (("not-correct", not_correct), ("incorrect", incorrect)):
        assert propose.failed_attempts(attempts_part([attempt]), propose_for) == ([attempt] if wanted else [])


def test_propose_for_is_a_setting_in_the_fingerprint() -> None:
    assert [v.value for v in propose.ProposeFor] == ["not-correct", "incorrect"]
    settings = propose_settings()
    assert settings.propose_for == "not-correct"  # the release's choice
    assert propose.fingerprint(settings)["propose_for"] == "not-correct"
    narrow = propose.ProposeSettings(2, Sampling(), load_prompt("propose_single.md"), propose_for="incorrect")
    assert propose.fingerprint(narrow)["propose_for"] == "incorrect" and "include_truncated" not in propose.fingerprint(
        narrow)
    with pytest.raises(ValueError, match="'truncated' is not a valid ProposeFor"):
        propose.ProposeSettings(2, Sampling(), load_prompt("propose_single.md"), propose_for="truncated")


def test_a_truncated_attempt_gets_proposals_by_default() -> None:
    cut = {"problem_id": "p", "attempt_id": "p/a1", "text": ATTEMPT[:60], "correct": None, "grade_reason": "truncated",
           "truncated": True, "error": None}
    part = attempts_part([cut])
    assert propose.work(part, propose_settings()) == 2 + 1  # two proposals and the first turn
    asked = []
    run_by_hand(propose.compute(part, propose_settings()),
                lambda ask: asked.append(ask) or [[Completion("I solve it.", "stop")] * r.n for r in ask.requests]
                if isinstance(ask, ModelCalls) else [])
    assert "Substep 1:" in asked[1].requests[0].messages[-1][1]
    narrow = propose.ProposeSettings(2, Sampling(max_tokens=64), load_prompt("propose_single.md"),
                                     propose_for="incorrect")
    assert propose.work(part, narrow) == 0


# --- the stage on plain rows ------------------------------------------------------------------------------

def propose_part(solution: str | None) -> Part:
    problem = {"problem_id": "p", "problem": "Tom has 3 apples and buys 4. He gives 2 away. How many?", "answer": "5",
               "solution": solution}
    attempt = {"problem_id": "p", "attempt_id": "p/a0", "text": ATTEMPT, "correct": False, "truncated": False,
               "grade_reason": "math", "error": None}
    return Part(0, {"graded": [attempt], "problems": [problem], "pass_rates": [{"problem_id": "p", "selected": True}]})


def propose_settings(allow: bool = False, proposals: int = 2) -> propose.ProposeSettings:
    return propose.ProposeSettings(proposals, Sampling(max_tokens=64), load_prompt("propose_critique.md"),
                                   load_prompt("propose_reference.md"), allow_no_reference=allow)


def test_a_problem_without_a_reference_is_skipped_and_counted() -> None:
    asked = []
    out = run_by_hand(propose.compute(propose_part(None), propose_settings()), lambda ask: asked.append(ask) or [])
    assert asked == [] and [row["reject_reason"] for row in out["proposals"]] == [propose.NO_REFERENCE] * 2
    assert all(row["error"] is None for row in out["proposals"])  # not a failure: nothing to retry


def test_allow_no_reference_tells_the_proposer_only_the_answer_is_known() -> None:
    seen = []

    def answer(ask):
        if isinstance(ask, ModelCalls):
            seen.extend(ask.requests)
            return [[Completion("I solve it.", "stop")] * r.n for r in ask.requests]
        return []

    run_by_hand(propose.compute(propose_part(""), propose_settings(allow=True)), answer)
    assert "Only the correct final answer is known: 5." in seen[0].messages[0][1]  # turn 1
    assert len(seen) == 2 and seen[1].messages[-1][0] == "user"
    # progress knows the work before the part starts: one first turn, P proposals
    assert propose.work(propose_part(""), propose_settings(allow=True)) == sum(r.n for r in seen) == 3


def test_a_failed_first_turn_is_an_error_to_retry() -> None:
    out = run_by_hand(propose.compute(propose_part("Add, then subtract: 5."), propose_settings()),
                      lambda ask: [[error_completion("http_503: down")]])
    rows = out["proposals"]
    assert [row["reject_reason"] for row in rows] == [propose.CALL_FAILED] * 2
    assert all(row["error"] == "http_503: down" for row in rows)  # the part is computed again on the next run


def test_a_reply_cut_at_the_token_limit_is_truncated_not_a_parse_failure() -> None:
    row = propose.proposal_row({"problem_id": "p", "attempt_id": "p/a0"}, STEPS, 0)
    cut = propose.read_reply(row, Completion("\n\n\n\n   \n\n", "length"), STEPS)
    assert cut["reject_reason"] == propose.TRUNCATED
    whole = propose.read_reply(row, Completion('{"verification": "v", "error_step": 2, "intervention": "Redo it."}',
                                               "stop"), STEPS)
    assert whole["reject_reason"] is None and whole["intervened_text"] == STEPS[0] + "Redo it."
    assert whole["step_ends"] == [len(STEPS[0]), len(STEPS[0] + STEPS[1]), len("".join(STEPS[:3])), len(ATTEMPT)]


# Replies of a schema-constrained engine to the critique, one per proposal, and what becomes of each.
STAGE_REPLIES = [
    (r'{"verification": "Substep 2 says $3 + 4 = 8$.", "draft": "I add $3 + 4$ again.", "self_check": "No, No, No.", '
     r'"error_step": 2, "intervention": "I add again: $3 + 4 = 7$, then I take away $\frac{2}{1}$ apples."}', None),
    (r'{"verification": "v", "draft": "d", "self_check": "Q1: yes, revised.", "error_step": 2, '
     r'"intervention": "I add again, and then the total is $\boxed{5}$."}', propose.LEAKS_ANSWER),
    (r'{"verification": "v", "draft": "d", "self_check": "s", "error_step": 3, '
     r'"intervention": "Now I subtract: $7 - 2 = 5$ apples remain."}', propose.LEAKS_ANSWER),
    (r'{"verification": "v", "draft": "d", "self_check": "s", "error_step": 2, "intervention": "112"}',
     propose.DEGENERATE),
    (r'{"verification": "v", "draft": "d", "self_check": "s", "error_step": 2, "intervention": "test_replication"}',
     propose.DEGENERATE),
    (r'{"verification": "All correct.", "draft": "", "self_check": "", "error_step": 0, "intervention": ""}',
     propose.NO_ERROR_FOUND),
]


def test_the_stage_reads_schema_replies_and_judges_each() -> None:
    settings = propose_settings(proposals=len(STAGE_REPLIES))

    def answer(ask):
        if isinstance(ask, Grading):
            return grade_now(ask)
        if ask.requests[0].n == 1:  # turn 1
            return [[Completion("3 + 4 - 2 = 5, so \\boxed{5}.", "stop")]]
        assert json.loads(ask.requests[0].json_schema) == propose.proposal_schema(len(STEPS))
        return [[Completion(reply, "stop") for reply, _ in STAGE_REPLIES]]

    rows = run_by_hand(propose.compute(propose_part("Add, then subtract: 5."), settings), answer)["proposals"]
    assert [row["reject_reason"] for row in rows] == [reason for _, reason in STAGE_REPLIES]
    assert [row["accepted"] for row in rows] == [reason is None for _, reason in STAGE_REPLIES]
    kept = rows[0]
    assert kept["intervened_text"] == STEPS[0] + "I add again: $3 + 4 = 7$, then I take away $\\frac{2}{1}$ apples."
    assert all(no_control(row[key]) for row in rows for key in ("intervention", "verification", "intervened_text"))
    assert {key for row in rows for key in row} == set(propose.PROPOSAL_SCHEMA)


@pytest.mark.parametrize("reply", ['{"a' * 20000, "{'a" * 20000, '{"""a' * 20000, '{"a": ' * 5000 + "1" + "}" * 5000,
                                   '{"verification": "' + '"x' * 30000, ('{"' + "y" * 50) * 2000])
def test_a_hostile_reply_is_read_in_linear_time(reply: str) -> None:
    import time

    start = time.perf_counter()
    assert propose.parse_proposal(reply, 4).reject_reason == propose.NO_BLOCK
    assert time.perf_counter() - start < 5  # about 0.2 s; unbounded inner quotes took minutes
