"""Probe documents and their per-token losses: the contract between the trainers (which score them during
training), score_checkpoints (which scores kept checkpoints) and the study tools (which gather the scores).

Written once, here, for both trainers (modded_nanogpt imports it, as it imports nanogpt.rundir); the files are
written as the run directory writes its checkpoints (nanogpt.rundir.atomic_write, fsync_dir).

Docs file (python -m nanogpt.data.select_docs writes one): an .npz of
  tokens    uint16, the documents one after another, each starting with its BOS/end-of-text token (the speedrun
            packs documents into one forward by it, and refuses a file whose documents do not: check_document_starts)
  lengths   int64, tokens per document (BOS included)
  shards    str, the val token file each came from ("" for a document encoded from text)
  offsets   int64, the position of its BOS in that file (-1 for text); a document may run on into the next file
  meta      str, JSON: data_dir, bos_id, vocab_size, tokenizer, how the documents were chosen
  sha256    str, of lengths (little-endian int64) then tokens (little-endian uint16): the documents' content
Document i has lengths[i] - 1 scores: the next-token loss of token t + 1 given tokens 0..t.

probes/ in a run directory:
  docs.npz          a copy of the docs file the run scores
  step_NNNNNNN.npy  float32, every document's scores one after another (np.load(mmap_mode="r") reads a part);
                    written to a temporary name, flushed and renamed, so a file under its final name is complete
  index.json        {"format", "docs_sha256", "steps": {"N": {"tokens": ..., "source": "train" | "checkpoint"}}},
                    rewritten (temporary name + rename) after the step's .npy: a step is stored when both say so
A process killed between the two leaves an .npy the index does not list: it is written again, never counted twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanogpt.rundir import atomic_write, fsync_dir

INDEX_FORMAT = 1
_STEP_FILE = re.compile(r"^step_(\d+)\.npy$")
_CHECKPOINT = re.compile(r"^step_(\d+)\.pt$")
WEIGHTS_DIR = "weights"  # ckpt/weights/step_NNNNNNN.pt: weights-only checkpoints kept for studies


class ProbeError(ValueError):
    """A docs file or a probes/ folder that cannot be used; the message names it."""


def content_hash(tokens: np.ndarray, lengths: np.ndarray) -> str:
    digest = hashlib.sha256(np.asarray(lengths, dtype="<i8").tobytes())
    digest.update(np.asarray(tokens, dtype="<u2").tobytes())
    return digest.hexdigest()


@dataclass
class Docs:
    tokens: np.ndarray
    lengths: np.ndarray
    shards: np.ndarray
    offsets: np.ndarray
    meta: dict
    sha256: str

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    @property
    def score_starts(self) -> np.ndarray:
        """Where each document's scores begin in a step's array (document i has lengths[i] - 1 of them)."""
        return np.concatenate([[0], np.cumsum(self.lengths - 1)[:-1]]).astype(np.int64)

    @property
    def num_scores(self) -> int:
        return int((self.lengths - 1).sum())

    def document(self, i: int) -> np.ndarray:
        start = int(self.starts[i])
        return np.asarray(self.tokens[start:start + int(self.lengths[i])], dtype=np.int64)


def make_docs(documents: list[np.ndarray], shards: list[str], offsets: list[int], meta: dict) -> Docs:
    if not documents:
        raise ProbeError("no documents to write")
    short = [i for i, d in enumerate(documents) if len(d) < 2]
    if short:
        raise ProbeError(f"documents {short} have fewer than 2 tokens: nothing to predict")
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    tokens = np.concatenate(documents).astype(np.uint16)
    return Docs(tokens, lengths, np.array(shards, dtype=str), np.array(offsets, dtype=np.int64), meta,
                content_hash(tokens, lengths))


def write_docs(path: str | os.PathLike, docs: Docs) -> None:
    """Write a docs file atomically (temporary name + rename)."""
    atomic_write(Path(path), lambda f: np.savez(f, tokens=docs.tokens, lengths=docs.lengths, shards=docs.shards,
                                                  offsets=docs.offsets, meta=np.array(json.dumps(docs.meta)),
                                                  sha256=np.array(docs.sha256)))


def read_docs(path: str | os.PathLike) -> Docs:
    """Read and check a docs file: every field there, the content hash right."""
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"{path}: docs file not found (python -m nanogpt.data.select_docs writes one)")
    try:
        with np.load(path, allow_pickle=False) as data:
            fields = {k: data[k] for k in ("tokens", "lengths", "shards", "offsets", "meta", "sha256")}
    except (OSError, ValueError, KeyError) as e:
        raise ProbeError(f"{path}: not a docs file of nanogpt.data.select_docs ({type(e).__name__}: {e})") from None
    docs = Docs(fields["tokens"], fields["lengths"].astype(np.int64), fields["shards"], fields["offsets"],
                json.loads(str(fields["meta"])), str(fields["sha256"]))
    if int(docs.lengths.sum()) != len(docs.tokens) or len(docs) == 0 or (docs.lengths < 2).any():
        raise ProbeError(f"{path}: its lengths do not add up to its {len(docs.tokens)} tokens")
    actual = content_hash(docs.tokens, docs.lengths)
    if actual != docs.sha256:
        raise ProbeError(f"{path}: content hash {actual[:12]} differs from the recorded {docs.sha256[:12]} (damaged)")
    return docs


def check_vocabulary(docs: Docs, vocab_size: int, where: str) -> None:
    largest = int(docs.tokens.max())
    if largest >= vocab_size:
        raise ProbeError(f"{where}: token id {largest} is outside the model's vocabulary of {vocab_size} (documents "
                         "of another tokenizer? select them from the run's data_dir)")


def check_document_starts(docs: Docs, bos_id: int, where: str) -> None:
    """Every document starts with the trainer's BOS token (bos_id < 0: the trainer has none to check). The speedrun
    packs documents into one forward and tells them apart by it: a document without one would be read as the
    rest of the document before it."""
    if bos_id < 0:
        return
    firsts = docs.tokens[docs.starts]
    bad = np.flatnonzero(firsts != bos_id)
    if len(bad):
        first = int(bad[0])
        raise ProbeError(f"{where}: document {first} starts with token {int(firsts[first])}, not the model's BOS "
                         f"token {bos_id} ({len(bad)} of {len(docs)} documents do not; the file was selected with "
                         f"bos_id {docs.meta.get('bos_id')}); select them from the run's data_dir (python -m "
                         f"nanogpt.data.select_docs DATA_DIR --bos_id={bos_id} ...)")


def probe_steps(every: int, steps: str, total_steps: int) -> list[int]:
    """The steps to score: every N steps from 0 (and the last step), or a comma-separated list."""
    if every < 0:
        raise ProbeError(f"probe_every={every}: must not be negative (0 = off)")
    if every and steps.strip():
        raise ProbeError("give probe_every or probe_steps, not both")
    if every:
        return sorted(set(range(0, total_steps + 1, every)) | {total_steps})
    if not steps.strip():
        return []
    try:
        chosen = sorted({int(s) for s in steps.split(",")})
    except ValueError:
        raise ProbeError(f"probe_steps={steps!r}: not a comma-separated list of steps like '0,10,100'") from None
    outside = [s for s in chosen if not 0 <= s <= total_steps]
    if outside:
        raise ProbeError(f"probe_steps: {outside} outside the run's steps 0..{total_steps}")
    return chosen


def checkpoint_steps(spec: str, total_steps: int) -> set[int]:
    """The steps of save_checkpoints (checkpoints kept for studies): '' | 'every:N' | '100,500,1000'."""
    spec = spec.strip()
    if not spec:
        return set()
    try:
        if spec.startswith("every:"):
            every = int(spec[len("every:"):])
            if every < 1:
                raise ValueError
            return set(range(every, total_steps + 1, every))
        return {int(s) for s in spec.split(",")}
    except ValueError:
        raise ProbeError(f"--save_checkpoints: {spec!r} is not '', 'every:N' or a list of steps like '100,500'") from None


class ProbeStore:
    """probes/ of one run directory. Only an enabled store (rank 0) writes; any store reads."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True):
        self.dir = Path(run_dir) / "probes"
        self.enabled = enabled

    # --- reading ------------------------------------------------------------------------------------

    def index(self) -> dict:
        path = self.dir / "index.json"
        if not path.is_file():
            return {"format": INDEX_FORMAT, "docs_sha256": None, "steps": {}}
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise ProbeError(f"{path}: not valid JSON ({e})") from None

    def steps(self) -> dict[int, dict]:
        """The stored steps: listed in the index and their .npy present."""
        listed = self.index()["steps"]
        return {int(s): entry for s, entry in sorted(listed.items(), key=lambda kv: int(kv[0]))
                if self.path(int(s)).is_file()}

    def path(self, step: int) -> Path:
        return self.dir / f"step_{step:07d}.npy"

    def docs(self) -> Docs:
        return read_docs(self.dir / "docs.npz")

    def read(self, step: int) -> np.ndarray:
        """A step's scores, memory-mapped (nothing is read until used)."""
        return np.load(self.path(step), mmap_mode="r")

    # --- writing ------------------------------------------------------------------------------------

    def attach(self, docs: Docs, fresh: bool = False) -> None:
        """Make probes/ hold `docs`. A fresh run sets an earlier run's probes/ aside (probes.1, ...); a resumed run
        must score the documents it scored before."""
        if not self.enabled:
            return
        existing = self.dir / "docs.npz"
        if fresh and self.dir.exists():
            n = 1
            while self.dir.with_name(f"probes.{n}").exists():
                n += 1
            os.replace(self.dir, self.dir.with_name(f"probes.{n}"))
        elif existing.is_file():
            recorded = read_docs(existing).sha256
            if recorded != docs.sha256:
                raise ProbeError(f"{self.dir} holds scores of other documents (hash {recorded[:12]}; the docs given "
                                 f"have {docs.sha256[:12]}): score the same docs file, or use another run directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("*.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
        if not existing.is_file():
            write_docs(existing, docs)
        index = self.index()
        if index.get("docs_sha256") != docs.sha256:
            self._write_index({"format": INDEX_FORMAT, "docs_sha256": docs.sha256, "steps": index["steps"]})

    def write(self, step: int, scores: np.ndarray, tokens: int, source: str) -> None:
        if not self.enabled:
            return
        array = np.ascontiguousarray(scores, dtype=np.float32)
        atomic_write(self.path(step), lambda f: np.save(f, array))
        index = self.index()
        index["steps"][str(step)] = {"tokens": int(tokens), "source": source}
        self._write_index(index)

    def drop_after(self, step: int) -> list[int]:
        """Forget the steps after `step` (a run resumed from `step` scores them again); returns them."""
        if not self.enabled or not self.dir.is_dir():
            return []
        index = self.index()
        later = sorted(int(s) for s in index["steps"] if int(s) > step)
        if later:
            index["steps"] = {s: e for s, e in index["steps"].items() if int(s) <= step}
            self._write_index(index)
        for path in self.dir.iterdir():
            m = _STEP_FILE.match(path.name)
            if m and int(m.group(1)) > step:
                path.unlink(missing_ok=True)
        return later

    def _write_index(self, index: dict) -> None:
        atomic_write(self.dir / "index.json", lambda f: f.write((json.dumps(index, indent=1) + "\n").encode()))
        fsync_dir(self.dir)


def kept_checkpoints(run_dir: str | os.PathLike) -> dict[int, Path]:
    """step -> the checkpoint to score: ckpt/step_N.pt (full), else ckpt/weights/step_N.pt (weights only)."""
    ckpt_dir = Path(run_dir) / "ckpt"
    found = {}
    for folder in (ckpt_dir / WEIGHTS_DIR, ckpt_dir):  # the full checkpoint of a step wins
        if folder.is_dir():
            found |= {int(m.group(1)): p for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name))}
    return dict(sorted(found.items()))


def score_checkpoints(run_dir: str | os.PathLike, docs_file: str | None, score, log=print, check=None) -> list[int]:
    """Score every kept checkpoint of a run not scored yet (`score(path, docs) -> (scores, tokens)`), each step
    written as soon as it is done: run again, it goes on where it stopped and scores nothing twice. `check(docs,
    where, kept)` (kept: step -> checkpoint) may refuse the documents (ProbeError) before anything is written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ProbeError(f"{run_dir}: run directory not found")
    store = ProbeStore(run_dir)
    if docs_file:
        docs = read_docs(docs_file)
    elif (store.dir / "docs.npz").is_file():
        docs = store.docs()
    else:
        raise ProbeError(f"{run_dir}: no probes/docs.npz yet; give --docs FILE (python -m nanogpt.data.select_docs)")
    kept = kept_checkpoints(run_dir)
    if not kept:
        raise ProbeError(f"{run_dir / 'ckpt'}: no checkpoint to score (keep them with --save_checkpoints=every:N)")
    if check is not None:
        check(docs, docs_file or str(store.dir / "docs.npz"), kept)
    store.attach(docs)
    done = store.steps()
    todo = [step for step in kept if step not in done]
    log(f"{run_dir}: {len(kept)} kept checkpoints, {len(kept) - len(todo)} already scored, {len(todo)} to score")
    for step in todo:
        scores, tokens = score(kept[step], docs)
        store.write(step, scores, tokens, "checkpoint")
        log(f"probe | step {step} | {len(docs)} documents | mean loss {scores.mean():.4f} | {kept[step]}")
    return todo


class Study:
    """A trainer's side of a study: at the chosen steps it scores the probe documents into probes/ (the trainer
    pauses its clock and passes the scores) and keeps checkpoints for scoring later (full ones are the trainer's
    own, in ckpt/; weights-only ones, save_as=weights_bf16, in ckpt/weights/)."""

    def __init__(self, run_dir, probe_docs: str, probe_every: int, probe_steps_spec: str, save_checkpoints: str,
                 save_as: str, total_steps: int, vocab_size: int, master: bool, bos_id: int = -1):
        """bos_id >= 0: every document must start with it (check_document_starts); -1: nothing to check."""
        self.run_dir = Path(run_dir)
        self.docs = read_docs(probe_docs) if probe_docs else None
        if self.docs is not None:
            check_vocabulary(self.docs, vocab_size, probe_docs)
            check_document_starts(self.docs, bos_id, probe_docs)
        self.steps = set(probe_steps(probe_every, probe_steps_spec, total_steps))
        if self.steps and self.docs is None:
            raise ProbeError("probe_every/probe_steps need --probe_docs=FILE (python -m nanogpt.data.select_docs)")
        if self.docs is not None and not self.steps:
            raise ProbeError(f"probe_docs={probe_docs}: give --probe_every=N or --probe_steps=A,B,... too")
        if save_as not in ("full", "weights_bf16"):
            raise ProbeError(f"--save_checkpoints_as: {save_as!r} is not one of full, weights_bf16")
        kept = checkpoint_steps(save_checkpoints, total_steps)
        self.full_steps = kept if save_as == "full" else set()
        self.weight_steps = kept if save_as == "weights_bf16" else set()
        self.store = ProbeStore(run_dir, enabled=master)
        self.master = master
        self.stored: set[int] = set()

    def start(self, resumed_step: int | None, log=print) -> None:
        """A fresh run sets an earlier probes/ aside; a resumed one forgets the steps after its checkpoint (it scores
        them again), so no step is lost or written twice."""
        if self.docs is None:
            return
        self.store.attach(self.docs, fresh=resumed_step is None)
        if resumed_step is not None:
            dropped = self.store.drop_after(resumed_step)
            if dropped:
                log(f"probes: steps {dropped} were scored after the checkpoint of step {resumed_step}; scored again")
        self.stored = set(ProbeStore(self.run_dir).steps())
        log(f"probes: {len(self.docs)} documents ({self.docs.num_scores:,} scores each time) at {len(self.steps)} "
            f"steps, {len(self.stored)} already scored; {self.store.dir}")

    def due(self, step: int) -> bool:
        return step in self.steps and step not in self.stored

    def record(self, step: int, scores: np.ndarray, tokens: int, seconds: float, log=print) -> None:
        self.store.write(step, scores, tokens, "train")
        self.stored.add(step)
        log(f"probe | step {step} | {len(self.docs)} documents | mean loss {scores.mean():.4f} | {seconds:.3f}s, "
            "not timed")

    def save_weights(self, step: int, state_dict: dict, tokens: int, extra: dict, log=print) -> None:
        """A weights-only checkpoint (not for resuming) when `step` is one of them: ckpt/weights/step_N.pt."""
        path = weights_checkpoint_path(self.run_dir, step)
        if not self.master or step not in self.weight_steps or path.is_file():  # a resumed run wrote it already
            return
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": "weights_bf16", "step": step, "tokens": tokens, "model": bf16_weights(state_dict), **extra}
        atomic_write(path, lambda f: torch.save(payload, f))
        fsync_dir(path.parent)
        log(f"checkpoint (weights, bf16) | step {step} | {path}")


def score_checkpoints_main(argv, module_doc: str, prog: str, score_checkpoint, resolve_device,
                           check=None) -> list[int]:
    """The command line of <trainer>.score_checkpoints: `score_checkpoint(path, docs, device) -> (scores, tokens)`;
    `check` as score_checkpoints takes it."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=module_doc.split("\n")[0],
                                     epilog=module_doc.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory of this trainer")
    parser.add_argument("--docs", help="the docs file (default: the run's probes/docs.npz)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    return score_checkpoints(args.run_dir, args.docs, lambda path, docs: score_checkpoint(path, docs, device),
                             check=check)


def checkpoint_tokens(payload: dict) -> int:
    """Training tokens seen by a checkpoint: a full one keeps them in its state, a weights-only one beside it."""
    return payload["state"]["tokens"] if "state" in payload else payload["tokens"]


def weights_checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "ckpt" / WEIGHTS_DIR / f"step_{step:07d}.pt"


def bf16_weights(state_dict: dict) -> dict:
    """A model's state for scoring only: its matrices and tables (parameters of 2+ dimensions) in bfloat16, the
    rest (scalars, norms' gains, buffers) as they are."""
    import torch

    return {k: (v.detach().to(torch.bfloat16) if v.is_floating_point() and v.ndim >= 2 else v.detach()).cpu().clone()
            for k, v in state_dict.items()}
