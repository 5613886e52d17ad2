"""Every weight precision end to end on the tiny model: disaggregated equals aggregated token for
token, and mixed precision (a float32
context worker with an int8 generation worker, one KV dtype) serves."""
import pytest

from client import Client
from tests.harness import Deployment
from tests.test_pipeline import prompts_for_equality

pytestmark = pytest.mark.timeout(240)

PROMPTS = prompts_for_equality()[::3]
SAMPLING = dict(max_tokens=8, ignore_eos=True)


def serve(workers: dict) -> list:
    """Token ids of every prompt through a deployment of ``workers`` {name: (role, options)}."""
    with Deployment() as d:
        for name, (role, options) in workers.items():
            d.add_worker(role, name, options=options)
        with Client(d.frontend, timeout=60) as c:
            out = [c.generate(**kw, **SAMPLING).token_ids for kw in PROMPTS]
        d.wait_idle()
    return out


@pytest.mark.parametrize("options", [{"quantization": "none"}, {"quantization": "fp16"},
                                     {"quantization": "int8"},
                                     {"dtype": "bfloat16", "quantization": "none"}],
                         ids=["float32", "fp16-weights", "int8", "bfloat16"])
def test_disaggregated_equals_aggregated_in_each_precision(options):
    disagg = serve({"ctx": ("context", options), "gen": ("generation", options)})
    agg = serve({"both": ("both", options)})
    assert all(len(ids) == SAMPLING["max_tokens"] for ids in agg)
    assert disagg == agg


def test_mixed_weight_precision_with_one_kv_dtype_serves():
    fp32 = {"quantization": "none"}
    mixed = serve({"ctx": ("context", fp32), "gen": ("generation", {"quantization": "int8"})})
    ref = serve({"both": ("both", fp32)})
    assert all(len(ids) == SAMPLING["max_tokens"] for ids in mixed)
    # the first token is the float32 context worker's own
    assert [ids[0] for ids in mixed] == [ids[0] for ids in ref]
