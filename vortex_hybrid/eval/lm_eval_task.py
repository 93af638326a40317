"""Write local lm-evaluation-harness tasks from the evaluation's generators: `vh_<task>` for the
single-answer retrieval tasks, a JSONL of prompts (rendered with the model's tokenizer, its chat
template included) and a YAML that names it by absolute path (lm-eval resolves relative data paths
from the working directory, not the YAML's folder).

    python -m vortex_hybrid.eval.lm_eval_task --out DIR [--model smollm2-135m] [--context 2048]
    python -m vortex_hybrid.integrations.lm_eval run --model vortex_hybrid \\
        --model_args pretrained=smollm2-135m --tasks vh_passkey --include_path DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import tasks as task_lib
from .models import DEFAULT_MODEL, resolve_model

SINGLE_ANSWER = ("passkey", "niah_single", "niah_multikey")
YAML = """task: vh_{task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_new}
  do_sample: false
filter_list:
  - name: first_number
    filter:
      - function: regex
        regex_pattern: "(\\\\d+)"
        group_select: 0
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  context_tokens: {context}
"""


def write_tasks(out: Path, tokenizer, tasks, context: int, samples: int, seed: int,
                max_new: int = 16) -> list[str]:
    """Write vh_<task>.jsonl and .yaml under `out` for each task; returns the task names."""
    bad = [t for t in tasks if t not in SINGLE_ANSWER]
    if bad:
        raise ValueError(f"tasks {bad}: lm-eval tasks are written for {', '.join(SINGLE_ANSWER)}")
    chat = bool(getattr(tokenizer, "chat_template", None))
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for task in tasks:
        data = out / f"vh_{task}.jsonl"
        with open(data, "w") as fh:
            for s in task_lib.make_suite([task], tokenizer, context, samples, seed, chat):
                fh.write(json.dumps({"prompt": tokenizer.decode(task_lib.render(s, tokenizer, chat)),
                                     "answer": s.answers[0]}) + "\n")
        (out / f"vh_{task}.yaml").write_text(YAML.format(task=task, data=data.resolve(),
                                                          max_new=max_new, context=context))
        names.append(f"vh_{task}")
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vortex_hybrid.eval.lm_eval_task",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the YAML and JSONL files")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="whose tokenizer renders the prompts")
    ap.add_argument("--tasks", default="passkey,niah_single")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(resolve_model(args.model))
        names = write_tasks(Path(args.out), tok, [t for t in args.tasks.split(",") if t],
                            args.context, args.samples, args.seed)
    except (ValueError, OSError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(names)} under {args.out} (lm-eval: --include_path {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
