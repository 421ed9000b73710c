"""MoFaSGD with the Hugging Face transformers Trainer (copy this file).

    pip install mofasgd transformers accelerate
    python hf_trainer.py [--steps 60] [--out /tmp/mofasgd-hf-trainer]

A small GPT-2 built from a config (random init, nothing downloaded) learns a synthetic language:
sequences that count up from a random token. Trainer
takes one optimizer object and one scheduler (`optimizers=(opt, scheduler)`), so the paper's split
- MoFaSGD on the hidden matrices, AdamW on embeddings, biases and norm gains - is wrapped into one
`MoFaSGDWithAdamW`; its param_groups are both optimizers' groups, so the LR scheduler reaches all of
them. BetaWarmup (beta 0.65 -> 0.85) is stepped by a TrainerCallback after each optimizer step.
Exits with status 1 if the held-out loss did not fall below half its initial value.
"""

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from mofasgd import BetaWarmup, MoFaSGD


class MoFaSGDWithAdamW(torch.optim.Optimizer):
    """MoFaSGD on the 2-D weights of the transformer blocks, AdamW on the rest, as one optimizer."""

    def __init__(self, model, adamw_lr=3e-3, adamw_betas=(0.8, 0.95), **mofasgd_kwargs):
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        params = [p for p in model.parameters() if p.requires_grad]  # the tied head counts once
        matrices = [p for p in params if p.ndim == 2 and id(p) not in embeddings]
        others = [p for p in params if p.ndim != 2 or id(p) in embeddings]
        self.mofasgd = MoFaSGD(matrices, **mofasgd_kwargs)
        self.adamw = torch.optim.AdamW(others, lr=adamw_lr, betas=adamw_betas)
        super().__init__(params, {})
        self.param_groups = self.mofasgd.param_groups + self.adamw.param_groups  # shared dicts

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.mofasgd.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none=True):
        self.mofasgd.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {"mofasgd": self.mofasgd.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict):
        self.mofasgd.load_state_dict(state_dict["mofasgd"])
        self.adamw.load_state_dict(state_dict["adamw"])


class BetaWarmupCallback(TrainerCallback):
    def __init__(self, warmup):
        self.warmup = warmup

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.warmup.step()


class CountingTask(torch.utils.data.Dataset):
    """Sequences that count up from a random start (mod vocab): every token after the first is
    predictable from the one before it."""

    def __init__(self, size, length=32, vocab=128, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (size, 1), generator=g)
        self.input_ids = (start + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "labels": self.input_ids[i]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="/tmp/mofasgd-hf-trainer")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config)  # randomly initialised from the config: no download
    train, held_out = CountingTask(16 * args.steps, seed=0), CountingTask(64, seed=1)

    optimizer = MoFaSGDWithAdamW(model, lr=0.05, rank=16)  # MoFaSGD's other defaults: the paper's
    beta = BetaWarmup(optimizer.mofasgd, steps=args.steps // 2)  # a run this short warms up faster
    total = args.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # flat, then linear cooldown over the last 40%
        optimizer, lambda step: min(1.0, (total - step) / (0.4 * total)))

    training_args = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=16, logging_steps=10,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=held_out,
                      optimizers=(optimizer, scheduler), callbacks=[BetaWarmupCallback(beta)])
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    steps_taken = [int(st["step"]) for st in optimizer.mofasgd.state.values()]
    print(f"MoFaSGD updated {len(steps_taken)} matrices, {min(steps_taken)} steps each")
    print(f"held-out loss: {before:.3f} -> {after:.3f} (beta now {beta.get_last_value():.3f})")
    raise SystemExit(0 if after < before / 2 else 1)


if __name__ == "__main__":
    main()
