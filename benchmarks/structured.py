"""Structured output and tool calling on SmolLM2-135M-Instruct: how often constrained output
validates, what the constraint costs in decode speed, and how often the model completes a
two-tool task.

    .venv/bin/python benchmarks/structured.py                 # 200 generations + 20 tool runs
    .venv/bin/python benchmarks/structured.py --threads 1     # on a machine shared with other work
    .venv/bin/python benchmarks/structured.py --subjects 5    # a quick look (50 generations)

How each figure is measured:
  validate %   10 schemas × --subjects subjects (20: 200 generations), chat prompts asking for the
               JSON, temperature 0.7 with a seed per case, max_tokens 400 (more than the longest
               instance of any schema here: SmolLM2 spells digits one token each); the output must
               `json.loads` and pass `jsonschema.validate` (an independent validator). A generation
               cut by max_tokens counts as a failure.
  tokens/s     decode only: from the first generated token to the last, (tokens − 1) / seconds, summed
               over runs. Every --every-th case is also generated without the constraint (same prompt,
               same sampling, EOS ignored, as many tokens as the constrained run made), interleaved with the
               constrained runs so both see the same machine load. Cost = 1 − constrained / unconstrained.
  tool task    "Get the temperature in Paris, then add 10 to it." with tools get_temperature and add:
               round 1 any call (grammar: tool_choice=required), its result fed back, round 2 any call
               again; success when the calls are get_temperature(Paris) then add(18, 10) in either order
               of operands. --tool-runs runs at temperature 0.7, a seed per round.
Writes benchmarks/results/structured.json. On a shared machine the speeds are indicative; the
cost ratio is robust because the two modes are interleaved.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jsonschema
import torch

import plinth
from plinth import tools as toolkit
from plinth.constrain import json_schema_grammar
from plinth.files import write_atomic
from plinth.generate import SamplingParams, generate_stream

ROOT = Path(__file__).resolve().parent.parent
SUBJECTS = ["Paris", "the Moon", "Python", "a bicycle", "coffee", "the Amazon river", "chess", "Mount Everest",
            "the violin", "photosynthesis", "Tokyo", "a volcano", "honey bees", "the Roman Empire", "jazz",
            "a lighthouse", "penguins", "the printing press", "tea", "Saturn"]
TEXT = {"type": "string", "maxLength": 60}
SHORT = {"type": "string", "maxLength": 24}
SCHEMAS = [  # (prompt with {x}, schema)
    ("Describe {x} in JSON with a name, a one-sentence description and up to three tags.",
     {"type": "object", "properties": {"name": SHORT, "description": TEXT,
                                       "tags": {"type": "array", "items": SHORT, "maxItems": 3}},
      "required": ["name", "description", "tags"], "additionalProperties": False}),
    ("Rate {x} from 1 to 5 and explain why, as JSON.",
     {"type": "object", "properties": {"rating": {"type": "integer", "minimum": 1, "maximum": 5}, "reason": TEXT},
      "required": ["rating", "reason"], "additionalProperties": False}),
    ("Is {x} a person, a place, a thing or an idea? Answer in JSON.",
     {"type": "object", "properties": {"subject": SHORT, "kind": {"enum": ["person", "place", "thing", "idea"]}},
      "required": ["subject", "kind"], "additionalProperties": False}),
    ("Give three short facts about {x} as a JSON list of strings.",
     {"type": "array", "items": TEXT, "minItems": 3, "maxItems": 3}),
    ("Write a JSON quiz question about {x} with its answer and your confidence between 0 and 1.",
     {"type": "object", "properties": {"question": TEXT, "answer": SHORT,
                                       "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
      "required": ["question", "answer", "confidence"], "additionalProperties": False}),
    ("Is {x} older than 100 years? Reply as JSON with a yes/no field and the approximate year it began.",
     {"type": "object", "properties": {"older_than_100_years": {"type": "boolean"},
                                       "year": {"type": "integer", "minimum": -10000, "maximum": 2030}},
      "required": ["older_than_100_years", "year"], "additionalProperties": False}),
    ("List one pro and one con of {x} in JSON.",
     {"type": "object", "properties": {"pros": {"type": "array", "items": TEXT, "minItems": 1, "maxItems": 2},
                                       "cons": {"type": "array", "items": TEXT, "minItems": 1, "maxItems": 2}},
      "required": ["pros", "cons"], "additionalProperties": False}),
    ("Give a title and a short summary for an encyclopedia article about {x}, as JSON.",
     {"type": "object", "properties": {"title": SHORT, "summary": TEXT}, "required": ["title", "summary"],
      "additionalProperties": False}),
    ("Give the sentiment most people feel about {x} as JSON.",
     {"type": "object", "properties": {"sentiment": {"enum": ["positive", "neutral", "negative"]},
                                       "score": {"type": "number", "minimum": -1, "maximum": 1}},
      "required": ["sentiment", "score"], "additionalProperties": False}),
    ("Name {x} and two related things, with a code like ABC-123, in JSON.",
     {"type": "object", "properties": {"name": SHORT, "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                       "related": {"type": "array", "items": SHORT, "minItems": 2, "maxItems": 2}},
      "required": ["name", "code", "related"], "additionalProperties": False}),
]


def get_temperature(city: str) -> int:
    """Current temperature in a city, in degrees Celsius."""
    return {"Paris": 18}.get(city, 0)


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def timed(model, prompt: list[int], params: SamplingParams) -> tuple[str, int, float, str]:
    """(text, generated tokens, decode seconds after the first token, finish reason)."""
    pieces, count, first = [], 0, None
    for step in generate_stream(model.model, model.tokenizer, prompt, params):
        first = first or time.perf_counter()
        pieces.append(step.text)
        count += 1
        finish = step.finish_reason
    return "".join(pieces), count, time.perf_counter() - first, finish


def structured_runs(m, subjects: int, every: int) -> dict:
    valid, cases, con, free = 0, 0, [0, 0.0], [0, 0.0]
    failures = []
    for s, subject in enumerate(SUBJECTS[:subjects]):
        for k, (template, schema) in enumerate(SCHEMAS):
            prompt = m.tokenizer.encode(m.tokenizer.apply_chat_template(
                [{"role": "user", "content": template.format(x=subject)}]), add_bos=False)
            params = dict(max_tokens=400, temperature=0.7, seed=cases)  # above any schema's longest instance
            text, n, seconds, finish = timed(m, prompt, SamplingParams(**params, grammar=json_schema_grammar(schema)))
            con[0], con[1] = con[0] + n - 1, con[1] + seconds
            try:
                jsonschema.validate(json.loads(text), schema)
                valid += 1
            except (json.JSONDecodeError, jsonschema.ValidationError) as e:
                failures.append({"case": cases, "finish": finish, "text": text, "error": str(e)[:200]})
            print(f"case {cases}: {n} tokens, {(n - 1) / seconds:.1f} tok/s, valid so far {valid}/{cases + 1}",
                  flush=True)
            if cases % every == 0:
                _, n_free, seconds_free, _ = timed(m, prompt, SamplingParams(**{**params, "max_tokens": max(n, 2)},
                                                                             ignore_eos=True))
                free[0], free[1] = free[0] + n_free - 1, free[1] + seconds_free
            cases += 1
    constrained, unconstrained = con[0] / con[1], free[0] / free[1]
    return {"generations": cases, "valid": valid, "valid_pct": 100 * valid / cases, "failures": failures,
            "constrained_tok_s": constrained, "unconstrained_tok_s": unconstrained,
            "slowdown_pct": 100 * (1 - constrained / unconstrained)}


def tool_runs(m, runs: int) -> dict:
    tools = [toolkit.tool_from_function(f) for f in (get_temperature, add)]
    grammar = toolkit.call_grammar(toolkit.check_tools(tools), parallel=False)
    successes, transcripts = 0, []
    for seed in range(runs):
        messages = [{"role": "user", "content": "Get the temperature in Paris, then add 10 to it."}]
        calls = []
        for round_ in range(2):
            prompt = m.tokenizer.encode(toolkit.render(m.tokenizer, messages, tools), add_bos=False)
            text = m.generate(prompt, grammar=grammar, temperature=0.7, seed=10 * seed + round_, max_tokens=120)
            _, found = toolkit.parse(text, toolkit.check_tools(tools))
            if not found or found[0].error:
                calls.append((text, None, found[0].error if found else "no call"))
                break
            call = found[0]
            result = toolkit.call_function({"get_temperature": get_temperature, "add": add}, call)
            calls.append((call.name, json.loads(call.arguments), result))
            messages += [{"role": "assistant", "content": None, "tool_calls": [call.as_openai()]},
                         {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result}]
        ok = (len(calls) == 2 and calls[0][:2] == ("get_temperature", {"city": "Paris"})
              and calls[1][0] == "add" and sorted(calls[1][1].values()) == [10, 18])
        successes += ok
        print(f"tool run {seed}: {calls} {'ok' if ok else 'failed'}", flush=True)
        transcripts.append({"seed": seed, "calls": calls, "success": ok})
    return {"runs": runs, "successes": successes, "success_rate": successes / runs, "transcripts": transcripts}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=20, help="subjects per schema (10 schemas)")
    parser.add_argument("--every", type=int, default=4, help="also run every N-th case unconstrained")
    parser.add_argument("--tool-runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="model threads (1 on a machine shared with other work: see DESIGN.md)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "structured.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    m = plinth.load("smollm2-135m-instruct")
    result = {"model": "smollm2-135m-instruct", "load_average": os.getloadavg()[0], "threads": args.threads,
              "structured": structured_runs(m, args.subjects, args.every), "tools": tool_runs(m, args.tool_runs)}
    s, t = result["structured"], result["tools"]
    print(f"{'generations':>14} {'valid':>7} {'constrained tok/s':>18} {'unconstrained tok/s':>20} {'slower':>7}")
    print(f"{s['generations']:>14} {s['valid_pct']:>6.1f}% {s['constrained_tok_s']:>18.1f} "
          f"{s['unconstrained_tok_s']:>20.1f} {s['slowdown_pct']:>6.1f}%")
    print(f"two-tool task: {t['successes']}/{t['runs']} runs succeeded")
    print(f"wrote {write_atomic(args.out, json.dumps(result, indent=2))}")


if __name__ == "__main__":
    main()
