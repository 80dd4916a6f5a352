"""Kept conversations: each one's SinkCache, found again by the next request of the same conversation.

A session holds the cache, the token ids of its conversation (what the cache consumed, plus the last generated
token, which the next turn feeds first) and a digest of the text those ids spell. A request (a prompt text: the chat
template's rendering of the messages) continues a session when:

1. **text**: its text begins with the session's text (compared by a blake2b digest of the UTF-8 prefix). Its ids are
   then the session's ids followed by the tokens of the text after it: exactly what a client of the library would
   feed turn by turn (``examples/streaming_chat.py``), however the template would tokenize the earlier reply anew;
2. **ids**, otherwise: the whole text is tokenized, and a session whose consumed ids (checked with its cache's
   ``TokenLedger`` hash, never by count) begin those ids is continued.

Either way ``generate()`` checks the prefix again with the ledger. A request that continues nothing (a new chat, an
edited or regenerated message, an evicted conversation) gets a new session and is prefilled in full.

A claimed session leaves the store until its request is done, so two requests never share a SinkCache mid-step;
a request that fails or is cancelled drops its session (its cache consumed a reply the client never got in full).
Sessions are evicted least recently used once their memory (``cache.nbytes`` plus 8 bytes per id) exceeds the
budget.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..cache import SinkCache
from ..ledger import prefix_hashes


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(eq=False)
class Session:
    """One conversation's stream.

    Attributes:
        cache: its SinkCache; ``cache.seen`` of ``ids`` are consumed.
        ids: ``[tokens]`` long, the conversation's ids so far (one past the consumed ones after a reply cut by
            ``max_tokens``: its last token is fed by the next turn).
        text_bytes: length of the UTF-8 text that ``ids`` spell, and ``text_digest`` its digest.
    """

    cache: SinkCache
    ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    text_bytes: int = 0
    text_digest: bytes = b""

    @property
    def nbytes(self) -> int:
        """Memory the session holds, in bytes: the cache's tensors and the ids."""
        return self.cache.nbytes + self.ids.numel() * self.ids.element_size()

    def extend(self, ids: torch.Tensor, text: bytes) -> None:
        """The session now stands for the conversation ``ids`` spelling ``text`` (its cache has consumed them,
        except perhaps the last)."""
        self.ids, self.text_bytes, self.text_digest = ids, len(text), digest(text)


@dataclass
class Claim:
    """What a request continues: ``session`` (taken out of the store, or a new one) and the request's ``ids``
    ``[tokens]``."""

    session: Session
    ids: torch.Tensor


class SessionStore:
    """Sessions under a memory budget, least recently used evicted first. Thread-safe.

    Args:
        budget_bytes: the most memory the kept sessions may hold together (``Session.nbytes``); 0 keeps none.
        new_cache: makes the SinkCache of a new session.
    """

    def __init__(self, budget_bytes: int, new_cache: Callable[[], SinkCache]):
        self.budget_bytes, self.new_cache = budget_bytes, new_cache
        self._sessions: OrderedDict[int, Session] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(session.nbytes for session in self._sessions.values())

    def claim(self, text: str, tokenize: Callable[[str], list[int]]) -> Claim:
        """The session that ``text`` continues, removed from the store, with the request's ids; or a new one."""
        data = text.encode()
        with self._lock:
            found = self._by_text(data)
            if found is not None:
                tail = torch.tensor(tokenize(data[found.text_bytes:].decode()), dtype=torch.long)
                continued = torch.cat([found.ids, tail])
                if continued.numel() > found.cache.seen:  # generate() needs a token the cache has not consumed
                    del self._sessions[id(found)]
                    return Claim(found, continued)
        ids = tokenize(text)
        with self._lock:
            found = self._by_ids(ids)
            if found is not None:
                self._sessions.pop(id(found))
        tensor = torch.tensor(ids, dtype=torch.long)
        if found is not None:
            return Claim(found, tensor)
        return Claim(Session(self.new_cache()), tensor)

    def _by_text(self, data: bytes) -> Session | None:
        """The kept session with the longest text that ``data`` begins with."""
        best = None
        for session in self._sessions.values():
            if session.text_bytes <= len(data) and (best is None or session.text_bytes > best.text_bytes) \
                    and digest(data[:session.text_bytes]) == session.text_digest:
                best = session
        return best

    def _by_ids(self, ids: list[int]) -> Session | None:
        """The kept session with the most consumed ids that ``ids`` begins with (by the ledgers' hashes)."""
        ledgers = [(s, s.cache.ledger) for s in self._sessions.values()
                   if s.cache.ledger.hashes is not None and len(s.cache.ledger.hashes) == 1
                   and s.cache.ledger.count < len(ids) and not s.cache.ledger.padded]
        hashes = prefix_hashes(ids, (ledger.count for _, ledger in ledgers))
        matching = [(ledger.count, s) for s, ledger in ledgers if [hashes[ledger.count]] == ledger.hashes]
        return max(matching, key=lambda pair: pair[0])[1] if matching else None

    def put(self, session: Session) -> None:
        """Keep ``session`` as the most recently used one; evict the least recently used ones over the budget."""
        with self._lock:
            self._sessions[id(session)] = session
            total = sum(s.nbytes for s in self._sessions.values())
            while self._sessions and total > self.budget_bytes:
                _, oldest = self._sessions.popitem(last=False)
                total -= oldest.nbytes
                self.evicted += 1
