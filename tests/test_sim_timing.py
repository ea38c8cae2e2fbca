"""Simulated time as the learner reads it: the parts of a PD request's wait match the cost
model (no wake-up, polling or measurement artefact adds steps)."""

from __future__ import annotations

from labkit.engines.sim.engine import SimEngine


def test_decode_first_step_after_nixl_read_is_one_modelled_step(tmp_path):
    """Notebook 06's split: after decode's NIXL read lands, the proxy's first byte comes
    after decode's next step boundary and its first step (with async scheduling the token
    leaves when the following step's launch ends): at most ~3 modelled decode steps plus
    the HTTP hops, not one step per requested token (a non-streamed answer's first byte is
    the whole answer; trace.phases() needs the streamed first token)."""
    from labkit.lab import Lab
    from labkit.teach import live

    prompt_len, max_tokens = 1000, 16
    with Lab(mode="sim", model="lab-tiny", chunk=512, num_gpu_blocks=96, max_num_seqs=16,
             run_dir=tmp_path / "run") as lab:  # fmt: skip
        assert lab.plan.connector == "nixl"
        live.send(lab, prompt_len=prompt_len, max_tokens=max_tokens, seed=1)  # warm the HTTP paths
        trace = live.send(lab, prompt_len=prompt_len, max_tokens=max_tokens)
        gpu_type = lab.plan.gpu_type.key
    rows = {r["part"].strip().split(" ")[0]: r["ms"] for r in trace.phases().rows}
    first_step_ms = next(r["ms"] for r in trace.phases().rows if "first token" in r["part"])
    step_s = sum(SimEngine("lab-tiny", gpu_type).cost_model.step_parts(
        1, 1, prompt_len, prompt_len))  # one decode token after a prompt_len-token prompt
    assert step_s * 1e3 < 20  # a tiny model's decode step costs a few ms on the cost model
    assert first_step_ms < 3 * step_s * 1e3 + 10, (first_step_ms, step_s, rows)
    assert trace.response["usage"]["completion_tokens"] == max_tokens
    assert len(trace.response["choices"][0]["text"]) > 0
