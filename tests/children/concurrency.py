"""Child of tests/test_concurrency.py: ``python -m children.concurrency MODEL_PATH``.

model.close() while two threads generate, one on its own session and one through the
engine; what the threads got, what later calls get, and whether the model is unmapped.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator

from children.channel import mapped, rss_kb, say
from llamabind import ClosedError, ContextConfig, LoadedModel


def close_model_while_generating(path: str) -> None:
    cfg = ContextConfig(n_ctx=256, n_batch=64, n_ubatch=64, n_threads=1)
    rss0 = rss_kb()
    model = LoadedModel.load(path, context=cfg, use_mmap=True)
    vocab = model.vocab
    eog = [t for t in range(vocab.n_tokens) if vocab.is_eog(t)]
    opts = dict(temperature=0, max_tokens=120, logit_bias={t: float("-inf") for t in eog})
    prompt = "Write a long story about a dragon."
    expected = model.generate(prompt, **opts).text    # what an undisturbed run gives
    assert mapped(path)

    own = model.create_session()
    started = {"own": threading.Event(), "pooled": threading.Event()}
    results = {}

    def consume(name: str, stream: Iterator[str]) -> None:
        pieces = []
        try:
            for piece in stream:
                pieces.append(piece)
                if len(pieces) == 3:
                    started[name].set()
            results[name] = ("finished", "".join(pieces), len(pieces))
        except BaseException as exc:
            results[name] = (type(exc).__name__, str(exc), len(pieces))
        finally:
            started[name].set()

    workers = [
        threading.Thread(target=consume, args=("own", own.stream(prompt, **opts)), daemon=True),
        threading.Thread(target=consume, args=("pooled", model.stream(prompt, **opts)),
                         daemon=True),
    ]
    for w in workers:
        w.start()
    for e in started.values():
        e.wait(120)
    t0 = time.monotonic()
    model.close()
    close_s = time.monotonic() - t0
    for w in workers:
        w.join(300)
        assert not w.is_alive(), "a generating thread did not finish after model.close()"
    after = {}
    calls: list[tuple[str, Callable[[], object]]] = [
        ("generate", lambda: model.generate("Hi", max_tokens=1)),
        ("create_session", model.create_session),
        ("own_session", lambda: own.generate("Hi", max_tokens=1))]
    for name, call in calls:
        try:
            call()
            after[name] = "ok"
        except ClosedError:
            after[name] = "ClosedError"
        except BaseException as exc:
            after[name] = type(exc).__name__ + ": " + str(exc)
    still_mapped_with_open_session = mapped(path)
    own.close()
    say("result", close_s=close_s, results=results, expected=expected, after=after,
        still_mapped_with_open_session=still_mapped_with_open_session,
        mapped_after=mapped(path), rss0=rss0, rss_end=rss_kb())


if __name__ == "__main__":
    close_model_while_generating(sys.argv[1])
