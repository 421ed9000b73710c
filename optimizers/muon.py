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

from mofasgd.optimizer import assign_owners, gather_sharded_state


class ShardedMuon(torch.optim.Muon):
    def __init__(self, params, shard: bool = True, process_group=None, **muon_kwargs):
        super().__init__(params, **muon_kwargs)
        self.shard = shard
        self._process_group = process_group
        self._owner_of = None  # parameter -> owner rank, when sharding
        self._rank, self._world_size = 0, 1
        self.exchanged_bytes = 0  # bytes this rank contributed to the last all-gather
        if shard and dist.is_available() and dist.is_initialized():
            self._rank = dist.get_rank(process_group)
            self._world_size = dist.get_world_size(process_group)
            params = [p for group in self.param_groups for p in group["params"]]
            owners = assign_owners([p.numel() for p in params], self._world_size)
            self._owner_of = dict(zip(params, owners))

    def _owns(self, p) -> bool:
        return self._owner_of is None or self._owner_of[p] == self._rank

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
        layout = [[] for _ in range(self._world_size)]
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
        send = torch.zeros(max(sizes), dtype=every[0].dtype, device=every[0].device)
        offset = 0
        for p in layout[self._rank]:
            send[offset : offset + p.numel()].copy_(p.reshape(-1))
            offset += p.numel()
        received = [torch.empty_like(send) for _ in range(self._world_size)]
        dist.all_gather(received, send, group=self._process_group)
        for owner, params in enumerate(layout):
            if owner == self._rank:
                continue
            offset = 0
            for p in params:
                p.copy_(received[owner][offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        return send.numel() * send.element_size()

    def consolidated_state_dict(self) -> dict:
        """state_dict() holding every matrix's momentum buffer: a collective when sharding (each
        rank holds only its own matrices' buffers; all ranks get the whole)."""
        full = self.state_dict()
        if self._owner_of is None:
            return full
        return gather_sharded_state(self, full, self._owns, self._process_group)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for p in list(self.state):  # a consolidated state holds every rank's buffers: keep our own
            if not self._owns(p):
                del self.state[p]
