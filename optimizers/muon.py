"""Muon on several data-parallel ranks as the paper's harness runs it: each rank orthogonalises only
its share of the matrices, then the results are all-gathered.

`ShardedMuon` is torch.optim.Muon whose update of a matrix runs on the matrix's owner rank alone
(owners balanced by size, `assign_owners`): every rank holds the same averaged gradients after
DDP, the owner applies torch's own Muon update (momentum, Newton-Schulz, lr adjustment, weight
decay) and its updated matrices are all-gathered into every rank's copy. The parameters are those
of torch.optim.Muon on one rank, bit for bit; each rank does 1/world of the Newton-Schulz work and
holds 1/world of the momentum buffers. Without an initialised process group (or shard=False) it
is torch.optim.Muon.

What is exchanged differs from the harness's own Muon (bf16 updates): the fp32 parameters, so
the result stays exactly torch's (2x the bytes of a bf16 update, reported as `exchanged_bytes`).
"""

import torch
import torch.distributed as dist

from mofasgd.optimizer import ShardedState, pack_flat, unpack_flat


class ShardedMuon(ShardedState, torch.optim.Muon):
    def __init__(self, params, shard: bool = True, process_group=None, **muon_kwargs):
        super().__init__(params, **muon_kwargs)
        self.shard = shard
        self._process_group = process_group
        self._assign_owners()  # ShardedState: owners, consolidated_state_dict(), exchanged_bytes

    def _init_group(self, group, params_with_grad, grads, momentum_buffers):
        # torch's step updates the parameters this collects: only the ones this rank owns
        owned = {**group, "params": [p for p in group["params"] if self._owns(p)]}
        return super()._init_group(owned, params_with_grad, grads, momentum_buffers)

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        if self._owner_of is not None:
            self.exchanged_bytes = self._all_gather_updated_parameters()
        return loss

    def _all_gather_updated_parameters(self) -> int:
        """Every owner's updated matrices into every rank: one flat buffer per rank, padded to the
        longest (all_gather needs equal sizes). Which matrices took a step is the same on every rank
        (the same ones hold gradients under data parallelism), so the layout needs no message."""
        world = dist.get_world_size(self._process_group)
        layout = [[] for _ in range(world)]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    layout[self._owner_of[p]].append(p)
        sizes = [sum(p.numel() for p in params) for params in layout]
        if max(sizes) == 0:
            return 0
        every = [p for params in layout for p in params]
        if len({p.dtype for p in every}) != 1:
            raise RuntimeError("ShardedMuon needs all its parameters in one dtype")
        send = pack_flat(layout[self._shard_rank], max(sizes), every[0].dtype, every[0].device)
        received = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(received, send, group=self._process_group)
        for owner, params in enumerate(layout):
            if owner != self._shard_rank:
                for p, update in zip(params, unpack_flat(received[owner], [p.shape for p in params])):
                    p.copy_(update)
        return send.numel() * send.element_size()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for p in list(self.state):  # a consolidated state holds every rank's buffers: keep our own
            if not self._owns(p):
                del self.state[p]
