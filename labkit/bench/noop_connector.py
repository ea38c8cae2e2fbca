"""A KV connector that does nothing: the observer-overhead benchmark's third arm.

    kv_transfer_config = {"kv_connector": "NoopConnector", "kv_role": "kv_both",
                          "kv_connector_module_path": "labkit.bench.noop_connector"}

vLLM pays for carrying any KV connector (its per-layer hooks, build_connector_meta,
update_connector_output and get_finished every step, the KVConnectorOutput path, deferred
block frees for a kv_both engine) whatever the connector does. An engine with this one beside
a plain engine and an observed one splits the observer's measured cost into vLLM's part
(noop / plain) and the observer's own (observed / noop): `python -m
labkit.bench.observer_overhead --method offline --noop-connector`. Imported by vLLM only.
"""
from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
)


class NoopMetadata(KVConnectorMetadata):
    pass


class NoopConnector(KVConnectorBase_V1):
    """Every abstract hook of KVConnectorBase_V1 (vLLM 0.26), returning what "nothing to do"
    means to vLLM: no matched tokens, no loads, no saves, empty metadata."""

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return NoopMetadata()
