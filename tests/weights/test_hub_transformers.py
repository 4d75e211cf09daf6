"""transformers' `from_pretrained` through the Hub door: the bundled demo model, published
with its transformers variant, loads from a real gunicorn with HF_ENDPOINT and a portal API
token, and its greedy tokens are the portal's own engine's, for two prompts.

transformers runs in a subprocess: huggingface_hub reads HF_ENDPOINT when it is imported,
and this test process may have imported it already.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from django.conf import settings

from access.services.reviews import application_approve
from access.tokens import token_create
from inference_demo.llama.checkpoint import load_model
from inference_demo.llama.generation import SamplingParams, generate
from inference_demo.llama.tokenizer import Tokenizer
from tests.servers import SERVER_SECRET_KEY, portal_gunicorn, process_env
from weights.models import Artifact, DownloadEvent
from weights.services.publishing import release_publish
from weights.storage import reset_storage

pytestmark = pytest.mark.django_db(transaction=True)

DEMO_DIR = Path(settings.BASE_DIR) / "inference_demo" / "demo_model"
SLUG = "llama-demo"
PROMPTS = ("The for statement", "A list comprehension")
NEW_TOKENS = 12

LOAD_AND_GENERATE = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    repo, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    tokenizer = AutoTokenizer.from_pretrained(repo)
    model = AutoModelForCausalLM.from_pretrained(repo, torch_dtype=torch.float32).eval()
    out = {"fast": tokenizer.is_fast, "prompts": [], "tokens": []}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            full = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
        out["prompts"].append(ids[0].tolist())
        out["tokens"].append(full[0, ids.shape[1]:].tolist())
    print(json.dumps(out))
    """
)


def our_greedy_tokens(prompt: str) -> tuple[list[int], list[int]]:
    tokenizer = Tokenizer(DEMO_DIR / "tokenizer.model")
    model = load_model(DEMO_DIR, max_seq_len=256)
    model.setup_caches(max_batch_size=1, max_seq_len=256)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    completion = generate(model, tokenizer, prompt, params).collect()
    return tokenizer.encode(prompt, bos=True, eos=False), completion.token_ids


def test_from_pretrained_through_the_portal_reproduces_our_greedy_tokens(
    settings, tmp_path, alice, reviewer, make_submitted, releases
):
    root = tmp_path / "weights"
    root.mkdir()
    settings.WEIGHTS_STORAGE, settings.WEIGHTS_LOCAL_ROOT = "local", root
    settings.SECRET_KEY = SERVER_SECRET_KEY  # the token is stamped with the server's key
    reset_storage()
    release = release_publish(directory=DEMO_DIR, slug=SLUG, name="LLaMA demo").release
    assert release.artifacts.filter(variant=Artifact.Variant.TRANSFORMERS, path="config.json")
    releases[SLUG] = release  # so that alice can apply for it
    [grant] = application_approve(
        application=make_submitted(alice, slugs=(SLUG,)),
        reviewer=reviewer,
        releases=[release],
    )
    token = token_create(user=alice, name="transformers", second_factor=False).secret

    storage = {"WEIGHTS_STORAGE": "local", "WEIGHTS_LOCAL_ROOT": str(root)}
    with portal_gunicorn(tmp_path, storage) as (port, _log):
        env = {
            "HF_ENDPOINT": f"http://127.0.0.1:{port}",
            "HF_TOKEN": token,
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_PROXY": "127.0.0.1,localhost",
        }
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                LOAD_AND_GENERATE,
                f"{settings.WEIGHTS_HUB_NAMESPACE}/{SLUG}",
                json.dumps(PROMPTS),
                str(NEW_TOKENS),
            ],
            env=process_env(env),
            capture_output=True,
            text=True,
            timeout=300,
        )
    reset_storage()
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])

    assert got["fast"] is True  # tokenizer.json, no sentencepiece needed
    for prompt, ids, tokens in zip(PROMPTS, got["prompts"], got["tokens"], strict=True):
        want_ids, want_tokens = our_greedy_tokens(prompt)
        assert ids == want_ids, prompt
        assert tokens == want_tokens, prompt
    # The weights came through the grant's link, with its audit rows.
    link = grant.download_links.get(revoked_at__isnull=True)
    served = DownloadEvent.objects.filter(link=link, outcome="served")
    paths = set(served.values_list("artifact__path", flat=True))
    assert {"config.json", "tokenizer.json"} <= paths
    assert any(p.endswith(".safetensors") for p in paths)
