"""Who can take part in a round: the population N, the nodes' partitions, and each round's cohort.

Flower draws node ids at random, so everything here goes by the partition id each node reports
once (a QUERY message): the cohort is sampled over partitions and the replies are summed in
partition order, which is what makes a seeded run repeat exactly whatever ids Flower assigns.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from plateau.config import RunConfig
from plateau.flower_compat import is_simulation_grid
from plateau.messages import CONFIG_KEY, IDENTITY_KEY, SCHEMA_KEY, exchange, short_reason
from plateau.privacy.sampling import ClientSampler, Cohort

POPULATION_SETTLE_S = 1.0  # SuperNodes connecting over the network
SIMULATION_SETTLE_S = 0.1  # the simulation engine registers every node in one loop


def simulated(grid: Grid) -> bool:
    """Whether the grid is the simulation engine's."""
    return is_simulation_grid(grid)


class ClientPopulation:
    """The population N and the cohort sampler over the nodes' partitions.

    Parameters
    ----------
    config : RunConfig
        ``population-size`` (else N is the nodes connected at the first round), the audit's
        canaries (counted in N), ``min-available-clients``, ``round-timeout`` and the sampler's
        keys.
    secret : bool
        Whether the cohort must be drawn from OS entropy (under DP: a seeded cohort would let
        whoever knows the seed undo the amplification by sampling).
    """

    def __init__(self, config: RunConfig, *, secret: bool) -> None:
        self.config = config
        self.sampler = ClientSampler(config.sampling_method, config.sample_rate, secret=secret,
                                     seed=config.seed)
        self.population = 0  # N: the real clients plus the audit's canaries
        self.real_population = 0
        self.partitions: dict[int, int] = {}  # node id -> partition id
        self.partition_counts: set[int] = set()  # num-partitions the nodes reported
        # dataset='local': partition id -> the silo's schema fingerprint (or its error), as
        # its node answered the partition query
        self.schemas: dict[int, dict[str, Any]] = {}

    def partition_of(self, node_id: int) -> int:
        """The node's partition id (a negative placeholder for a node never identified)."""
        return self.partitions.get(node_id, -1 - node_id)

    def connected_nodes(self, grid: Grid) -> list[int]:
        """The connected nodes, once at least min-available-clients are there."""
        wanted = self.config.min_available_clients
        deadline = time.monotonic() + self.config.round_timeout
        while len(nodes := sorted(grid.get_node_ids())) < wanted:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} of min-available-clients={wanted} nodes connected "
                    f"within round-timeout={self.config.round_timeout:g} s")
            log(INFO, "Waiting for nodes: %d of %d connected", len(nodes), wanted)
            time.sleep(1.0)
        return nodes

    def determine(self, grid: Grid) -> int:
        """N: population-size, or the nodes connected when the first round starts (once their
        number has stopped changing for a moment: SuperNodes register one by one)."""
        if not self.population:
            settle = SIMULATION_SETTLE_S if simulated(grid) else POPULATION_SETTLE_S
            connected, stable_since = len(self.connected_nodes(grid)), time.monotonic()
            while (not self.config.population_size
                   and time.monotonic() - stable_since < settle):
                time.sleep(settle / 4)
                if (now := len(grid.get_node_ids())) != connected:
                    connected, stable_since = now, time.monotonic()
            self.real_population = self.config.population_size or connected
            self.population = self.real_population + self.config.audit_canaries
            log(INFO, "population N = %d (%s)%s", self.population,
                "population-size" if self.config.population_size else
                f"the {connected} nodes connected at the first round",
                f", of which {self.config.audit_canaries} are the audit's canaries"
                if self.config.audit_canaries else "")
        return self.population

    def identify(self, grid: Grid, nodes: Iterable[int]) -> None:
        """Ask every node not yet known for its partition-id (one QUERY message each, once).

        A node that does not answer, answers badly, or claims a partition outside the population
        or one another node holds is left out of sampling (and logged): only partitions the
        population accounts for can ever be sampled.
        """
        unknown = [node for node in nodes if node not in self.partitions]
        if not unknown:
            return
        # the run config rides along: a node can prepare its model and data before round 1
        question = RecordDict({CONFIG_KEY: ConfigRecord({**self.config.to_dict(),
                                                       "question": "partition-id"})})
        messages = [Message(content=question, message_type=MessageType.QUERY, dst_node_id=node)
                    for node in unknown]
        taken = set(self.partitions.values())
        for answer in exchange(grid, messages, self.config.round_timeout,
                               self.config.reply_poll_interval):
            node = answer.metadata.src_node_id
            identity = (None if answer.has_error()
                        else answer.content.metric_records.get(IDENTITY_KEY))
            partition = identity.get("partition-id") if identity is not None else None
            if not isinstance(partition, int) or not 0 <= partition < self.real_population:
                log(WARNING, "node %d did not give a partition-id in 0..%d (%s): left out",
                    node, self.real_population - 1, short_reason(answer.error.reason)
                    if answer.has_error() else partition)
            elif partition in taken:
                log(WARNING, "node %d claims partition %d, which another node holds: left out",
                    node, partition)
            else:
                self.partitions[node] = partition
                taken.add(partition)
                if (schema := answer.content.config_records.get(SCHEMA_KEY)) is not None:
                    self.schemas[partition] = dict(schema)
                if isinstance(count := identity.get("num-partitions"), int) and count > 0:
                    self.partition_counts.add(count)

    def slots(self, grid: Grid) -> dict[int, int]:
        """Partition id -> node id of the identified, connected nodes."""
        connected = self.connected_nodes(grid)
        self.identify(grid, connected)
        slots = {self.partitions[node]: node for node in connected if node in self.partitions}
        if not slots:
            raise RuntimeError(f"none of the {len(connected)} connected nodes answered the "
                               "partition query with a partition-id within round-timeout="
                               f"{self.config.round_timeout:g} s")
        return slots

    def identified_partition_counts(self, grid: Grid) -> list[int]:
        """Identify the connected nodes now; the num-partitions values they reported."""
        self.slots(grid)
        return sorted(self.partition_counts)

    def sample(self, grid: Grid, server_round: int) -> Cohort:
        """This round's cohort over the identified partitions of the population."""
        population = self.determine(grid)
        return self.sampler.sample(self.slots(grid), population, server_round)

    def state_dict(self) -> dict[str, Any]:
        """N (never a sampler state: a resumed run draws fresh cohorts)."""
        return {"population": self.population}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore N; node ids are new after a restart, so partitions are asked again."""
        self.population = int(state["population"])
        self.real_population = self.population - self.config.audit_canaries
