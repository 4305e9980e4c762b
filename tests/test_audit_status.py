"""kernel.audit.StatusQuery: the audit status asked early and read later (the supervisor asks
before preparing the service, the audit sensor reads the answer), on the real kernel."""

from __future__ import annotations

import errno

import pytest

from corral.kernel import audit

pytestmark = pytest.mark.root


def test_an_early_question_gets_the_same_answer():
    early = audit.StatusQuery()
    now = audit.enabled()
    assert now in (0, 1, 2)
    # The kernel answers at the question (the reply only leaves later): the same status, unless
    # a supervisor elsewhere on the machine turned audit on or (the last one out) off in
    # between: kernel.auditholds tells that from its count of disables.
    assert early.enabled() in (0, 1) if now in (0, 1) else early.enabled() == now


def test_an_answer_is_read_once_and_an_unread_one_closes():
    query = audit.StatusQuery()
    query.enabled()
    with pytest.raises(OSError) as raised:
        query.enabled()
    assert raised.value.errno == errno.EBADF
    unread = audit.StatusQuery()
    sock = unread.sock
    unread.close()
    assert sock is not None and sock.fileno() == -1 and unread.sock is None
