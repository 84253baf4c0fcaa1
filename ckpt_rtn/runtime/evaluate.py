"""Perplexity of a checkpoint through the MindFormers network.

Measured as Golden Stick's W8A16 paper table is: the text is tokenized
once, cut into non-overlapping windows of `seq_len` tokens, and every token
after the first of a window is predicted from those before it; perplexity
is exp of the mean next-token negative log-likelihood over all of them.
WikiText-2 (`--wikitext`) is measured instead as Golden Stick measures it
(ckpt_rtn/tasks/wikitext.py prepares the chunks): MindFormers' PerplexityMetric
takes each chunk's mean loss over its labels that are not the pad token,
and averages those means over the chunks.
FP and quantized checkpoints go through the same network: a quantized one
gets its Linear layers replaced by the deploy loader's cells first. The
same forward passes give the prefill throughput (`TimedForward`).
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Tuple, TypeVar

import numpy as np

from . import deploy
from ..errors import STOP_SIGNALS, CkptRtnError, ConfigError
from ..models import ModelConfig, load_tokenizer
from .network import TimedForward, build_llama


@dataclass(frozen=True)
class Corpus:
    """Token windows to measure, and how.

    `pad_id` set: Golden Stick's WikiText-2 protocol (labels equal to it are
    masked out, the loss is the mean of per-chunk means); None: the plain
    mean over every predicted token of every window.
    """
    windows: np.ndarray
    pad_id: Optional[int] = None


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    loss: float
    tokens: int
    windows: int


def tokenize(config: ModelConfig, text: str) -> np.ndarray:
    return np.asarray(load_tokenizer(config).encode(text).ids, dtype=np.int32)


def windows(ids: np.ndarray, seq_len: int, max_tokens: Optional[int] = None) -> np.ndarray:
    """[n, seq_len] non-overlapping windows; a short tail is dropped."""
    taken = ids if max_tokens is None else ids[:max_tokens]
    count = len(taken) // seq_len
    if count == 0:
        what = (f"the text has {len(ids)} tokens" if len(taken) == len(ids) else
                f"--max-tokens {max_tokens} takes {len(taken)} of its {len(ids)} tokens")
        raise ConfigError(None, f"{what}, fewer than one window of {seq_len}")
    ids = taken
    return ids[:count * seq_len].reshape(count, seq_len)


def chunk_mean_loss(nll: np.ndarray, labels: np.ndarray, pad_id: int) -> "tuple[float, int]":
    """One chunk's loss as MindFormers' PerplexityCell computes it, and its token count.

    CrossEntropyLoss with the network's input mask: the mean NLL over the
    labels that are not the pad token (1e-8 keeps an all-pad chunk finite).
    """
    mask = labels != pad_id
    return float((nll * mask).sum() / (mask.sum() + 1e-8)), int(mask.sum())


def next_token_nll(logits: np.ndarray, window: np.ndarray) -> np.ndarray:
    """-log p(window[t+1] | window[:t+1]) for each t, from [seq, vocab] logits."""
    logits = logits[:-1].astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return log_z - logits[np.arange(len(logits)), window[1:]]


class Evaluator:
    """One checkpoint loaded into a MindFormers network compiled for `seq_len` windows."""

    def __init__(self, config: ModelConfig, checkpoint: "os.PathLike[str] | str",
                 seq_len: int, mode: str = "graph") -> None:
        self.seq_len = seq_len
        self.net = build_llama(config, seq_length=seq_len, mode=mode)
        self.quantized_layers = deploy.load_checkpoint_into(self.net, checkpoint, upcast=True)
        self.logits = TimedForward(self.net, seq_len)

    @property
    def prefill_tokens_per_second(self) -> Optional[float]:
        """Tokens the network took in per second of full-window forward passes (the first,
        compiling, pass not counted); None before two passes."""
        forward = self.logits
        return forward.calls * self.seq_len / forward.seconds if forward.calls else None

    def perplexity(self, text_windows: np.ndarray,
                   progress: Optional[Callable[[int], None]] = None) -> Perplexity:
        """Perplexity over `text_windows` ([n, seq_len] token ids)."""
        losses = np.concatenate(list(self._nll(text_windows, progress)))
        loss = float(losses.mean())
        return Perplexity(ppl=math.exp(loss), loss=loss, tokens=int(losses.size),
                          windows=len(text_windows))

    def chunk_perplexity(self, chunks: np.ndarray, pad_id: int,
                         progress: Optional[Callable[[int], None]] = None) -> Perplexity:
        """Perplexity as MindFormers' PerplexityMetric gives it over batches of one chunk."""
        per_chunk = [chunk_mean_loss(nll, chunk[1:], pad_id)
                     for nll, chunk in zip(self._nll(chunks, progress), chunks)]
        loss = float(np.mean([chunk_loss for chunk_loss, _ in per_chunk]))
        return Perplexity(ppl=math.exp(loss), loss=loss,
                          tokens=sum(count for _, count in per_chunk), windows=len(chunks))

    def measure(self, corpus: Corpus,
                progress: Optional[Callable[[int], None]] = None) -> Perplexity:
        if corpus.pad_id is None:
            return self.perplexity(corpus.windows, progress)
        return self.chunk_perplexity(corpus.windows, corpus.pad_id, progress)

    def _nll(self, text_windows: np.ndarray,
             progress: Optional[Callable[[int], None]]) -> Iterator[np.ndarray]:
        """Each window's next-token NLLs ([seq_len - 1]), in order."""
        if text_windows.shape[1] != self.seq_len:
            raise ValueError(f"windows of {text_windows.shape[1]} tokens for a network "
                             f"compiled for {self.seq_len}")
        for window in text_windows:
            yield next_token_nll(self.logits(window), window)
            if progress is not None:
                progress(1)


T = TypeVar("T")


def in_fresh_process(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a spawned child process, its result (or exception) returned here.

    MindSpore keeps a compiled network's memory until the process exits
    (~3.7 GB per SmolLM2 network at seq-len 1024), so comparing several
    checkpoints in one process grows without bound; a child per checkpoint
    returns all of it. `fn` must be a module-level function.

    The child leaves stop signals to this process, which ends it at once
    when one comes: a Ctrl-C (sent to both) printed the child's own
    traceback, and a SIGTERM sent here alone (as a service manager sends
    it) waited for the whole measurement.
    """
    context = multiprocessing.get_context("spawn")
    here, there = context.Pipe()
    child = context.Process(target=_child, args=(there, os.getpid()), name="ckpt-rtn-measure")
    answered = False
    try:
        with _stop_signals_ignored():
            child.start()
        there.close()
        here.send((fn, args))
        # The child's end of the pipe may outlive it (in a process MindSpore started):
        # its death is watched for too, or a child killed for memory would hang this.
        if here not in multiprocessing.connection.wait([here, child.sentinel]):
            raise EOFError
        ok, value = here.recv()
        answered = True
    except (EOFError, BrokenPipeError):  # it died before it could answer
        raise CkptRtnError(None, "the evaluation process died (out of memory? try a "
                                 "smaller --seq-len)") from None
    except OSError as exc:  # it could not be started
        raise CkptRtnError(None, f"cannot start the evaluation process: {exc.strerror}") from None
    finally:
        if child.pid is not None:
            if answered:
                child.join(_EXIT_S)  # it exits once it has answered
            if child.is_alive():  # a stop signal came, or its exit hangs
                child.kill()  # SIGTERM would break into MindSpore mid-compile, which then
                child.join()  # dumps its IR into ./rank_0
        there.close()
        here.close()
    if not ok:
        raise value
    return value


#: Seconds a child that answered may take to exit before it is killed.
_EXIT_S = 10.0


@contextlib.contextmanager
def _stop_signals_ignored() -> Iterator[None]:
    """Stop signals ignored while a child starts: an ignored signal stays ignored across
    exec (and Python keeps it so), so the child does not act on one, even while it imports,
    and leaves them to this process (MindSpore's own SIGINT guard, set while a graph runs,
    turns one into a SIGTERM to itself, which is ignored too). Starting takes milliseconds (the work goes through
    the pipe after); a signal sent meanwhile is lost. Only the main thread sets handlers:
    elsewhere the child takes signals as any process does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {}
    try:
        for signum in STOP_SIGNALS:
            handlers[signum] = signal.signal(signum, signal.SIG_IGN)
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _child(parent: "multiprocessing.connection.Connection", parent_pid: int) -> None:
    _die_with(parent_pid)
    try:
        fn, args = parent.recv()
        answer: Tuple[bool, Any] = (True, fn(*args))
    except CkptRtnError as exc:
        answer = (False, exc)
    except MemoryError as exc:  # numpy's own kind does not pickle
        answer = (False, MemoryError(str(exc)))
    except Exception:  # a bug: its traceback comes back as text
        answer = (False, RuntimeError(f"in the evaluation process:\n{traceback.format_exc()}"))
    parent.send(answer)
    parent.close()


#: prctl's option that sends this process a signal when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


def _die_with(parent_pid: int) -> None:
    """End this process when the command that started it dies. A SIGKILL of the command
    (the OOM killer, a scheduler's hard stop) runs no cleanup, and left the measurement
    running to its end. Linux's PR_SET_PDEATHSIG does it; elsewhere it stays as it was."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before that was set: while this one imported
        os._exit(1)
