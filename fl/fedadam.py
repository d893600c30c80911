"""FedAdam: FedAvg's rounds with server-side Adam on the averaged update (Reddi et al. 2021,
"Adaptive Federated Optimization", Algorithm 2).

Everything but the update rule is FedAvg's: sampling, streaming aggregation into weighted sums,
the global model in a file, the job state. The rule (fl/aggregation.py, FedAdamUpdate) treats the
clients' weighted mean update as a pseudo-gradient and keeps Adam's two moment tensors per model
tensor; with `accumulator_dir` they live in files (read and written a slice at a time, like the
sums), otherwise in memory, and either way they are saved into the job's state directory at the
end of every round, so a restarted server continues with the same moments.

The robust options (clip_norm, trim_fraction, median: fl/robust.py) are FedAvg's too: with them the
pseudo-gradient is the clipped mean, trimmed mean or median of the clients' updates.
"""

from __future__ import annotations

from typing import Any

from fl.fedavg import FedAvg, InitialModel
from fl.server_optimizers import FedAdamUpdate, ServerUpdate


class FedAdam(FedAvg):
    """FedAvg's rounds, Adam's step on the server (eta: server learning rate; tau: adaptivity)."""

    def __init__(
        self,
        initial_model: InitialModel,
        *,
        eta: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        **fedavg_options: Any,
    ) -> None:
        self.eta, self.beta1, self.beta2, self.tau = eta, beta1, beta2, tau
        super().__init__(initial_model, **fedavg_options)

    def new_update(self) -> ServerUpdate:
        # With file sums the moments are files too, kept in the state directory (they are job
        # state): RAM holds a few slices of them.
        moments_dir = self.state_dir if self.accumulator_dir is not None else None
        return FedAdamUpdate(self.eta, self.beta1, self.beta2, self.tau, moments_dir=moments_dir)
