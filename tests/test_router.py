"""Router: deterministic weighted split, shadow mode that never delays the answer, per-arm counters."""

from __future__ import annotations

import math
import time

import grpc
import numpy as np
import pytest

from ema_export.names import SIGNATURE_EMA, SIGNATURE_LIVE
from serving import ServingClient
from serving.protocol import InvalidRequestError, ModelNotFoundError
from serving.router import LATENCY_BUCKETS_S, Router, RouterConfig
from support.rpc import classification_inputs

SPLIT = {SIGNATURE_EMA: 0.9, SIGNATURE_LIVE: 0.1}


def offline_router(weights=SPLIT, salt: str = "") -> Router:
    # choose() never touches the network; a client to nowhere is enough.
    return Router(ServingClient("127.0.0.1:9"), RouterConfig("model", weights=weights, salt=salt))


def test_the_same_key_always_lands_on_the_same_arm_whatever_the_weights_order() -> None:
    router = offline_router()
    reordered = offline_router({SIGNATURE_LIVE: 0.1, SIGNATURE_EMA: 0.9})
    keys = [f"user-{index}" for index in range(2000)]
    first = [router.choose(key) for key in keys]
    assert first == [router.choose(key) for key in keys] == [reordered.choose(key) for key in keys]
    assert router.choose(b"user-1") == router.choose("user-1")


def test_the_split_follows_the_weights() -> None:
    router = offline_router()
    num_keys = 20_000
    share = sum(router.choose(f"session-{index}") == SIGNATURE_LIVE for index in range(num_keys)) / num_keys
    assert abs(share - 0.1) < 4 * math.sqrt(0.1 * 0.9 / num_keys)


def test_a_salt_reshuffles_keys_and_a_zero_weight_arm_gets_nothing() -> None:
    keys = [f"k{index}" for index in range(1000)]
    plain, salted = offline_router(), offline_router(salt="experiment-2")
    assert [plain.choose(key) for key in keys] != [salted.choose(key) for key in keys]
    only_ema = offline_router({SIGNATURE_EMA: 1.0, SIGNATURE_LIVE: 0.0})
    assert {only_ema.choose(key) for key in keys} == {SIGNATURE_EMA}


@pytest.mark.parametrize("weights", [{}, {SIGNATURE_EMA: -1.0}, {SIGNATURE_EMA: 0.0}, {SIGNATURE_EMA: math.nan}])
def test_bad_weights_are_refused(weights) -> None:
    with pytest.raises(InvalidRequestError, match="Received"):
        offline_router(weights)


@pytest.fixture(scope="module")
def client(classifier) -> ServingClient:
    with ServingClient(classifier.target, timeout=10) as opened:
        yield opened


@pytest.mark.slow
def test_routed_requests_are_answered_by_their_arm_and_counted(client, classifier) -> None:
    router = Router(client, RouterConfig(classifier.name, weights={SIGNATURE_EMA: 0.5, SIGNATURE_LIVE: 0.5}))
    inputs = classification_inputs(4)
    chosen = []
    for index in range(20):
        routed = router.predict(f"user-{index}", {"inputs": inputs})
        assert routed.signature == router.choose(f"user-{index}") and routed.shadow is None
        np.testing.assert_allclose(routed.prediction.outputs["output_0"], classifier.expected(inputs, routed.signature),
                                   atol=1e-6)  # fmt: skip
        chosen.append(routed.signature)
    metrics = {(arm.signature, arm.role): arm for arm in router.metrics().arms}
    for arm in (SIGNATURE_EMA, SIGNATURE_LIVE):
        counted = metrics[(arm, "primary")]
        assert counted.requests == chosen.count(arm) > 0 and counted.errors == 0
        assert counted.latency_buckets[-1] == counted.requests  # every loopback call is under 10 s
        assert 0 < counted.latency_sum_s < 10
    assert router.metrics().shadows == ()


@pytest.mark.slow
def test_shadow_divergence_matches_numpy(client, classifier) -> None:
    router = Router(client, RouterConfig(classifier.name, weights={SIGNATURE_EMA: 1.0}, shadow=SIGNATURE_LIVE))
    batches = [classification_inputs(16, seed=seed) for seed in range(5)]
    for index, batch in enumerate(batches):
        routed = router.predict(f"user-{index}", {"inputs": batch})
        assert (routed.signature, routed.shadow) == (SIGNATURE_EMA, SIGNATURE_LIVE)
        np.testing.assert_allclose(routed.prediction.outputs["output_0"], classifier.expected(batch, SIGNATURE_EMA),
                                   atol=1e-6)  # fmt: skip
    assert router.wait_for_shadows(timeout=10)

    every = np.concatenate(batches)
    live, ema = classifier.expected(every, SIGNATURE_LIVE), classifier.expected(every, SIGNATURE_EMA)
    (shadow,) = router.metrics().shadows
    assert (shadow.primary, shadow.shadow, shadow.comparisons, shadow.errors) == (SIGNATURE_EMA, SIGNATURE_LIVE, 5, 0)
    assert shadow.rows_compared == every.shape[0]
    assert shadow.rows_disagreeing == int(np.sum(live.argmax(axis=1) != ema.argmax(axis=1)))
    assert shadow.max_abs_diff == pytest.approx(np.abs(live - ema).max(), rel=1e-5)
    per_batch = [np.abs(classifier.expected(b, SIGNATURE_LIVE) - classifier.expected(b, SIGNATURE_EMA)).max()
                 for b in batches]  # fmt: skip
    assert shadow.sum_max_abs_diff == pytest.approx(sum(per_batch), rel=1e-5)
    roles = {(arm.signature, arm.role): arm.requests for arm in router.metrics().arms}
    assert roles == {(SIGNATURE_EMA, "primary"): 5, (SIGNATURE_LIVE, "shadow"): 5}


@pytest.mark.slow
def test_a_slow_shadow_does_not_delay_the_answer(fake_server) -> None:
    fake_server.behaviour.delay_s[SIGNATURE_LIVE] = 1.0
    with ServingClient(fake_server.target) as client:
        router = Router(client, RouterConfig("model", weights={SIGNATURE_EMA: 1.0}, shadow=SIGNATURE_LIVE))
        started = time.monotonic()
        routed = router.predict("user", {"inputs": classification_inputs(2)})
        answered_after = time.monotonic() - started
        assert routed.signature == SIGNATURE_EMA
        assert answered_after < 0.6, answered_after
        assert router.metrics().shadows[0].comparisons == 0  # the shadow is still on its way
        assert router.wait_for_shadows(timeout=10)
    assert router.metrics().shadows[0].comparisons == 1


def test_shadow_failures_are_counted_never_raised(fake_server) -> None:
    fake_server.behaviour.fail_every[SIGNATURE_LIVE] = (1, grpc.StatusCode.INTERNAL)
    with ServingClient(fake_server.target) as client:
        router = Router(client, RouterConfig("model", weights={SIGNATURE_EMA: 1.0}, shadow=SIGNATURE_LIVE))
        for index in range(3):
            router.predict(f"user-{index}", {"inputs": classification_inputs(2)})
        assert router.wait_for_shadows(timeout=10)
    (shadow,) = router.metrics().shadows
    assert (shadow.errors, shadow.comparisons) == (3, 0)
    roles = {(arm.signature, arm.role): (arm.requests, arm.errors) for arm in router.metrics().arms}
    assert roles[(SIGNATURE_LIVE, "shadow")] == (3, 3) and roles[(SIGNATURE_EMA, "primary")] == (3, 0)


@pytest.mark.slow
def test_primary_failures_raise_and_are_counted(client) -> None:
    router = Router(client, RouterConfig("no-such-model"))
    with pytest.raises(ModelNotFoundError):
        router.predict("user", {"inputs": classification_inputs(1)})
    (arm,) = router.metrics().arms
    assert (arm.signature, arm.role, arm.requests, arm.errors) == (SIGNATURE_EMA, "primary", 1, 1)


@pytest.mark.slow
def test_prometheus_exposition_has_per_signature_series(client, classifier) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    router = Router(client, RouterConfig(classifier.name, weights={SIGNATURE_EMA: 1.0}, shadow=SIGNATURE_LIVE))
    for index in range(3):
        router.predict(f"user-{index}", {"inputs": classification_inputs(2)})
    assert router.wait_for_shadows(timeout=10)
    registry = prometheus_client.CollectorRegistry()
    registry.register(router.prometheus_collector())
    text = prometheus_client.generate_latest(registry).decode()
    primary = f'model="{classifier.name}",role="primary",signature="{SIGNATURE_EMA}"'
    assert f"ema_serving_router_requests_total{{{primary}}} 3.0" in text
    assert f'ema_serving_router_latency_seconds_bucket{{le="+Inf",{primary}}} 3.0' in text
    assert f'ema_serving_router_latency_seconds_bucket{{le="{LATENCY_BUCKETS_S[-1]}",{primary}}} 3.0' in text
    shadow = f'model="{classifier.name}",primary="{SIGNATURE_EMA}",shadow="{SIGNATURE_LIVE}"'
    assert f"ema_serving_router_shadow_comparisons_total{{{shadow}}} 3.0" in text
