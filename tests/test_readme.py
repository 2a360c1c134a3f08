"""The commands in the README and the parts' READMEs: every module, script and make target they name exists, every
command line of a trainer, bench, sampler, preparer or the launcher parses with that program's own parser, and the
CPU-sized ones run as written (data and run directories swapped for the test's)."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex

from tests.fixtures import REPO_ROOT, read_metrics, run_module

DOCS = ["README.md", "nanogpt/README.md", "modded_nanogpt/README.md", "slurm/README.md", "tests/README.md"]


def code_lines(doc: str) -> list[str]:
    """The lines of a document's ```bash blocks, continuation lines joined."""
    lines, inside, text = [], False, ""
    for line in (REPO_ROOT / doc).read_text().splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```bash"
            continue
        if inside:
            text = f"{text} {line.strip()}" if text else line.strip()
            if text.endswith("\\"):
                text = text[:-1]
            elif text:
                lines.append(text)
                text = ""
    return lines


def commands(doc: str) -> list[list[str]]:
    """Each documented command as words, comments dropped, `a && b` split, leading VAR=value assignments dropped."""
    found = []
    for line in code_lines(doc):
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            command, words = words[:cut], words[cut + 1:]
            while command and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", command[0]):
                command = command[1:]
            if command:
                found.append(command)
    return found


def documented() -> list[tuple[str, list[str]]]:
    return [(doc, words) for doc in DOCS for words in commands(doc)]


def program(words: list[str]) -> tuple[str | None, list[str]]:
    """(module, its arguments) of a `python -m`, `torchrun ... -m` or `bash modded_nanogpt/run.sh` command."""
    if words[0] in ("python", "torchrun") and "-m" in words:
        i = words.index("-m")
        return words[i + 1], words[i + 2:]
    if words[:2] == ["bash", "modded_nanogpt/run.sh"]:
        return "modded_nanogpt.train_gpt", words[2:]
    return None, []


def parsers() -> dict:
    """Each program's own command-line parser: raises (or exits non-zero) on an argument it does not take."""
    from modded_nanogpt.data.cached_fineweb10B import parse_args as fineweb_args
    from modded_nanogpt.sample import SampleConfig as ModdedSampleConfig
    from modded_nanogpt.train_gpt import parse_hyperparameters
    from nanogpt.bench.throughput import BenchConfig
    from nanogpt.config import parse_config
    from nanogpt.data.openwebtext import build_parser as openwebtext_parser
    from nanogpt.data.text_corpus import build_parser as text_corpus_parser
    from nanogpt.sample import SampleConfig
    from nanogpt.train import TrainConfig
    from slurm.demo import parse_args as demo_args
    from slurm.report import parse_args as report_args
    from slurm.submit import build_parser as submit_parser

    return {
        "nanogpt.train": lambda args: parse_config(TrainConfig, args),
        "nanogpt.bench": lambda args: parse_config(BenchConfig, args),
        "nanogpt.sample": lambda args: parse_config(SampleConfig, args),
        "nanogpt.data.text_corpus": lambda args: text_corpus_parser().parse_args(args),
        "nanogpt.data.openwebtext": lambda args: openwebtext_parser().parse_args(args),
        "modded_nanogpt.train_gpt": parse_hyperparameters,
        "modded_nanogpt.sample": lambda args: parse_config(ModdedSampleConfig, args),
        "modded_nanogpt.data.cached_fineweb10B": fineweb_args,
        "slurm.submit": lambda args: submit_parser().parse_args(args),
        "slurm.report": report_args,
        "slurm.demo": demo_args,
    }


def test_the_documents_hold_the_commands_a_newcomer_needs():
    """The README's journeys are there: try, test, a baseline run, a speedrun run, a cluster submission."""
    readme = [" ".join(words) for words in commands("README.md")]
    for start in ("make demo", "make test", "python -m nanogpt.train --data_dir=", "python -m modded_nanogpt.train_gpt",
                  "sbatch --gres=gpu:h100:8", "python -m slurm.submit compare"):
        assert any(line.startswith(start) for line in readme), start
    assert len((REPO_ROOT / "README.md").read_text().splitlines()) <= 260


def test_every_named_module_script_and_make_target_exists():
    targets = set(re.findall(r"^([\w-]+):", (REPO_ROOT / "Makefile").read_text(), re.M))
    missing = []
    for doc, words in documented():
        module, _ = program(words)
        if module and importlib.util.find_spec(module) is None:
            missing.append(f"{doc}: module {module}")
        for word in words:
            if word.endswith(".sh") and not (REPO_ROOT / word).is_file():
                missing.append(f"{doc}: script {word}")
        if words[0] == "make" and words[1] not in targets:
            missing.append(f"{doc}: make target {words[1]}")
    assert not missing, missing


def test_every_documented_command_line_parses():
    """A renamed setting or option fails here, naming the document and the command. Synopses ([optional], <name>,
    a|b) are not command lines and are left to the existence check."""
    by_module, failures, parsed = parsers(), [], 0
    for doc, words in documented():
        module, args = program(words)
        if module not in by_module or any(re.search(r"[\[<|]", a) for a in args):
            continue
        try:
            by_module[module](list(args))
            parsed += 1
        except (Exception, SystemExit) as e:  # noqa: BLE001 - collect every failure, then report them together
            failures.append(f"{doc}: {' '.join(words)}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)
    assert parsed >= 25, parsed  # the documents' command lines were found and read


def readme_command(doc: str, start: str) -> list[str]:
    found = [words for words in commands(doc) if " ".join(words).startswith(start)]
    assert found, f"{doc} has no command starting with {start!r}"
    return found[0]


def swap(words: list[str], **paths) -> list[str]:
    """A command's words with --key=value (or `--key value`) paths replaced by the test's."""
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
            continue
        key = word[2:].split("=", 1)[0] if word.startswith("--") else None
        if key in paths and "=" in word:
            out.append(f"--{key}={paths[key]}")
        elif key in paths:
            out += [word, str(paths[key])]
            skip = True
        else:
            out.append(word)
    return out


def test_the_readmes_cpu_commands_run_as_written(text_source, tmp_path):
    """The README's corpus, its tiny speedrun (shortened to 4 steps) and sample, the baseline part's throughput
    bench, and the launcher's dry run. The README's tiny baseline run is test_train.py's."""
    corpus, runs = tmp_path / "corpus", tmp_path / "runs"
    prepare = readme_command("README.md", "python -m nanogpt.data.text_corpus")
    run_module(prepare[2], *swap(prepare[3:], out=corpus), "--source", text_source)
    assert json.loads((corpus / "corpus.json").read_text())["vocab_size"] > 0

    train = readme_command("README.md", "python -m modded_nanogpt.train_gpt")
    run_module(train[2], *swap(train[3:], data_dir=corpus, run_dir=runs / "modded"), "--num_iterations=4")
    assert read_metrics(runs / "modded")[-1]["kind"] == "end"
    sample = readme_command("README.md", "python -m modded_nanogpt.sample")
    proc = run_module(sample[2], *swap(sample[3:], run_dir=runs / "modded"), "--max_new_tokens=8")
    assert proc.stdout.count("def ") >= 2, proc.stdout

    bench = readme_command("nanogpt/README.md", "python -m nanogpt.bench tiny_cpu")
    proc = run_module(bench[2], *bench[3:], "--bench_warmup=1", f"--data_dir={corpus}")
    assert re.search(r"^bench \| [\d.]+ ms/step", proc.stdout, re.M), proc.stdout

    dry = readme_command("README.md", "python -m slurm.submit train modded")
    assert "--dry-run" in dry
    proc = run_module(dry[2], *dry[3:], "--data-dir", corpus, env={"RUNS_DIR": str(runs)}, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "seed" in proc.stdout and not (runs / "submissions").exists()
