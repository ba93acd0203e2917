"""LoRA adapters loaded and unloaded at run time over real HTTP, on the package's one Serve app
(`server`, conftest.py: `tiny` is the first deployment holding the tiny base, so runtime adapters
of that base go there and decode in one batch with `tiny`'s own rows; two ingress replicas follow
the adapter table).

References: each adapter merged into its own copy of the base and run alone with plain `generate`
(tests/serve/reference.py). Every adapter loaded here is unloaded again before the module ends, so
the other modules see the app's three configured models only.
"""

from __future__ import annotations

import concurrent.futures
import math
import shutil

import httpx
import pytest

from tests.serve.conftest import KEY, SECRETS, error_of
from tests.serve.reference import greedy, load

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {SECRETS['ops']}"}
PROMPT = "The quick brown fox"


def openai_client(server, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key=key, max_retries=0)


def load_adapter(server, name: str, path: str, **more) -> httpx.Response:
    return httpx.post(server["url"] + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path, **more},
                      headers=ADMIN, timeout=60)


def unload_adapter(server, name: str) -> httpx.Response:
    return httpx.post(server["url"] + "/v1/unload_lora_adapter", json={"lora_name": name}, headers=ADMIN, timeout=60)


@pytest.fixture
def loaded(server):
    """Names to unload when the test ends, whatever happened."""
    names: list[str] = []
    yield names
    for name in names:
        unload_adapter(server, name)


def complete(server, model: str, prompt: str = PROMPT, tokens: int = 12) -> httpx.Response:
    return server["client"].post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": tokens,
                                                          "temperature": 0, "ignore_eos": True})


def test_load_use_in_one_batch_with_the_base_and_unload(server, loaded, lora_dir, lora_dir_b):
    assert load_adapter(server, "sql", lora_dir_b).text == "Success: LoRA adapter 'sql' added successfully."
    loaded.append("sql")
    assert load_adapter(server, "chat", lora_dir).status_code == 200
    loaded.append("chat")
    client = openai_client(server)
    for _ in range(4):  # whichever ingress replica answers
        models = {m.id: m for m in client.models.list().data}
        assert {"tiny", "lora", "guarded", "sql", "chat"} == set(models)
    assert models["sql"].parent == server["tiny"] and models["sql"].root == lora_dir_b

    cases = [("tiny", None), ("sql", lora_dir_b), ("chat", lora_dir), ("sql", lora_dir_b)]
    prompts = [PROMPT, PROMPT, PROMPT, "def main():"]
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda c: complete(server, c[0][0], c[1], 40), zip(cases, prompts)))
    for (model, adapter), prompt, r in zip(cases, prompts, answers):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy(server["tiny"], prompt, max_new_tokens=40, min_new_tokens=40,
                                                        adapter_dir=adapter), model
        assert r.json()["model"] == model
    assert len({r.json()["choices"][0]["text"] for r in answers[:3]}) == 3  # base and two adapters: three outputs
    assert max(int(r.headers["x-llmos-batch-size"]) for r in answers) >= 2  # adapters' rows and the base's together

    assert unload_adapter(server, "sql").text == "Success: LoRA adapter 'sql' removed successfully."
    loaded.remove("sql")
    for _ in range(4):
        r = complete(server, "sql")
        assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
        assert "sql" not in {m.id for m in client.models.list().data}
    assert complete(server, "chat").status_code == 200  # the other adapter stays
    r = unload_adapter(server, "sql")
    assert r.status_code == 404 and error_of(r)["param"] == "lora_name"


def test_adapter_rows_keep_logprobs_streams_tokenize_embeddings_and_metering(server, loaded, lora_dir_b):
    import torch

    assert load_adapter(server, "sql", lora_dir_b).status_code == 200
    loaded.append("sql")
    admin = openai_client(server, SECRETS["ops"])
    out = admin.completions.create(model="sql", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                   extra_body={"ignore_eos": True}, extra_headers={"X-Request-Id": "lora-metered"})
    model, tok = load(server["tiny"], lora_dir_b)
    ids = tok.encode(PROMPT)
    text = out.choices[0].text
    assert text == greedy(server["tiny"], PROMPT, max_new_tokens=6, min_new_tokens=6, adapter_dir=lora_dir_b)
    full = server["client"].post("/tokenize", json={"model": "sql", "prompt": PROMPT + text}).json()["tokens"]
    assert full[:len(ids)] == ids
    generated = full[len(ids):]
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0].float()
    logits[:, sorted({tok.eos_token_id})] = float("-inf")  # ignore_eos masks it (documented)
    reference = torch.log_softmax(logits, dim=-1)
    got = out.choices[0].logprobs.token_logprobs
    assert len(got) == len(generated)
    for j, (token, value) in enumerate(zip(generated, got)):
        assert math.isclose(value, reference[len(ids) + j - 1, token].item(), abs_tol=1e-4)

    stream = admin.chat.completions.create(model="sql", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                           temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == greedy(
        server["tiny"], messages=[{"role": "user", "content": "Hi"}], max_new_tokens=5, adapter_dir=lora_dir_b)
    assert chunks[-1].usage.completion_tokens >= 1

    vector = admin.embeddings.create(model="sql", input="x").data[0].embedding
    base = admin.embeddings.create(model="tiny", input="x").data[0].embedding
    assert vector != base  # through the adapter

    from tests.serve.test_metering import ledger_rows

    row = ledger_rows(server, "ops").get("lora-metered")
    assert row is not None and (row["model"], row["completion_tokens"]) == ("sql", 6)
    assert row["prompt_tokens"] == out.usage.prompt_tokens == len(ids)


def test_load_takes_library_names_and_fsspec_uris(server, loaded, lora_dir, s3_bucket):
    import fsspec

    from llmos_ray import registry

    registry.register("sql-adapter", lora_dir, registry=server["registry"])
    assert load_adapter(server, "from-library", "sql-adapter").status_code == 200
    loaded.append("from-library")
    fs = fsspec.filesystem("s3")
    fs.put(lora_dir.rstrip("/") + "/", f"{s3_bucket}/adapter/", recursive=True)
    r = load_adapter(server, "from-s3", f"{s3_bucket}/adapter")
    assert r.status_code == 200, r.text
    loaded.append("from-s3")
    want = greedy(server["tiny"], PROMPT, max_new_tokens=12, min_new_tokens=12, adapter_dir=lora_dir)
    for name in ("from-library", "from-s3"):
        assert complete(server, name).json()["choices"][0]["text"] == want
    # load_inplace replaces a runtime adapter under the same name
    assert load_adapter(server, "from-s3", "sql-adapter", load_inplace=True).status_code == 200
    assert complete(server, "from-s3").json()["choices"][0]["text"] == want


def test_bad_loads_and_unloads_are_400_404_401_403(server, loaded, lora_dir, tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other_base)  # the same shapes, but not a base served here
    get_peft_model(AutoModelForCausalLM.from_pretrained(other_base), LoraConfig(
        r=2, target_modules=["c_attn"], fan_in_fan_out=True)).save_pretrained(tmp_path / "elsewhere")
    assert load_adapter(server, "x", lora_dir).status_code == 200
    loaded.append("x")
    cases = [({"lora_name": "y", "lora_path": tiny_model_dir}, "lora_path", "not a LoRA adapter"),
             ({"lora_name": "y", "lora_path": str(tmp_path / "nowhere")}, "lora_path", "neither a directory"),
             ({"lora_name": "y", "lora_path": str(tmp_path / "elsewhere")}, "lora_path", "trained on"),
             ({"lora_name": "x", "lora_path": lora_dir}, "lora_name", "already loaded"),
             ({"lora_name": "tiny", "lora_path": lora_dir}, "lora_name", "configured"),
             ({"lora_name": "../x", "lora_path": lora_dir}, "lora_name", "not a valid model name"),
             ({"lora_name": "y"}, "lora_path", "")]
    for body, param, message in cases:
        r = httpx.post(server["url"] + "/v1/load_lora_adapter", json=body, headers=ADMIN, timeout=60)
        assert r.status_code == 400 and error_of(r)["param"] == param and message in error_of(r)["message"], r.text
    assert "y" not in {m["id"] for m in server["client"].get("/v1/models").json()["data"]}
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        body = {"lora_name": "x", "lora_path": lora_dir}
        assert httpx.post(server["url"] + path, json=body, timeout=30).status_code == 401
        r = server["client"].post(path, json=body)  # a key that is not an admin key
        assert r.status_code == 403 and error_of(r)["code"] == "permission_denied"
    for body, status, param in [({"lora_name": "tiny"}, 400, "lora_name"), ({"lora_name": "nope"}, 404, "lora_name"),
                                ({"lora_name": "x", "lora_int_id": 3}, 400, "lora_int_id")]:
        r = httpx.post(server["url"] + "/v1/unload_lora_adapter", json=body, headers=ADMIN, timeout=30)
        assert r.status_code == status and error_of(r)["param"] == param, r.text
    assert complete(server, "x").status_code == 200  # none of it touched the loaded adapter


def test_a_replica_that_starts_later_follows_the_adapter_table(server, loaded, lora_dir, tiny_model_dir):
    """What a new replica of the base's deployment does (a restart, autoscaling): the adapters already
    loaded reach it from the table, and an unload too. Here a HostedAdapters in this process, on the
    application's real table."""
    import asyncio

    import ray
    from transformers import AutoModelForCausalLM

    from llmos_ray.serve.adapter_host import HostedAdapters
    from llmos_ray.serve.adapter_table import adapter_table
    from llmos_ray.serve.engine import Engine
    from llmos_ray.serve.types import AdapterRef

    assert load_adapter(server, "late", lora_dir).status_code == 200
    loaded.append("late")
    tables = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
              if a["name"].startswith(f"llmos-adapters-{server['app_name']}-")]
    engine = Engine(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), load(tiny_model_dir)[1],
                    name="tiny", max_tokens_limit=32)

    async def scenario():
        for name in tables:  # other apps of this session may have left tables: the one that has "late"
            if "late" in (await adapter_table(name).changes.remote(None, None, 0))[1]:
                hosted = HostedAdapters(engine, {}, name, "model-tiny")
        hosted.follow()
        for _ in range(100):
            if hosted.views:
                break
            await asyncio.sleep(0.05)
        loaded_here = {v.name for v in hosted.views.values()}
        assert unload_adapter(server, "late").status_code == 200
        loaded.remove("late")
        for _ in range(100):
            if not hosted.views:
                break
            await asyncio.sleep(0.05)
        gone = await hosted.view(AdapterRef("late", lora_dir, "no-such-load"))
        return loaded_here, dict(hosted.views), gone

    try:
        loaded_here, after, gone = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert loaded_here == {"late"} and after == {}
    assert gone.status == 404 and gone.code == "model_not_found"
