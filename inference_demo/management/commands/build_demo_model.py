from __future__ import annotations

import dataclasses
from typing import Any

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Train the small demo LLaMA (tokenizer + model) on the Python docs and write it "
        "in Meta's release layout: params.json, consolidated.0N.pth, checklist.chk, "
        "tokenizer.model, tokenizer_checklist.chk."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--out", required=True, help="output directory")
        parser.add_argument("--steps", type=int, help="training steps (default: the config's)")
        parser.add_argument("--seed", type=int, help="random seed (default: the config's)")
        parser.add_argument("--threads", type=int, help="CPU threads for training (default: 1)")

    def handle(self, *args: Any, out: str, **opts: Any) -> None:
        # torch is imported here only: loading management commands must not pull it in.
        from inference_demo.llama.demo_builder import DemoConfig, build_demo_model

        overrides = {k: opts[k] for k in ("steps", "seed", "threads") if opts[k] is not None}
        cfg = dataclasses.replace(DemoConfig(), **overrides)
        path = build_demo_model(out, cfg, log=self.stdout.write)
        self.stdout.write(self.style.SUCCESS(f"demo model written to {path}"))
