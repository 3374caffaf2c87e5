//! Where each partition starts after an assignment: at the offset stored in PostgreSQL.
//!
//! The Kafka group offset is only a hint (committed after the PostgreSQL transaction, asynchronously)
//! and may be behind, or, if someone resets it or a broker misbehaves, ahead of what was applied. Ahead
//! would silently skip events, so on every assignment this context overrides the start offset with the
//! position it knows from PostgreSQL. The map is refreshed from the `projection_offsets` table on every
//! batch, so it can only lag (never lead) the table: a lagging start re-reads a few messages, which the
//! per-batch offset check skips.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};

/// Next offset to read, per (topic, partition).
pub type Positions = HashMap<(String, i32), i64>;

/// The projector's consumer context; see the module docs.
#[derive(Clone, Default)]
pub struct PositionContext {
    positions: Arc<Mutex<Positions>>,
    /// Group membership health of the consumer this context belongs to.
    pub health: platform::kafka::GroupHealth,
}

impl PositionContext {
    /// A context for a new consumer instance: the same positions, its own health.
    pub fn for_new_consumer(&self) -> Self {
        Self {
            positions: self.positions.clone(),
            health: platform::kafka::GroupHealth::default(),
        }
    }

    /// Records positions known to be applied (only ever moves forward).
    pub fn advance(&self, known: &Positions) {
        let mut positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        for (tp, &next) in known {
            let entry = positions.entry(tp.clone()).or_insert(next);
            *entry = (*entry).max(next);
        }
    }

    fn start_offsets(&self, tpl: &mut TopicPartitionList) {
        let positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        let wanted: Vec<(String, i32, Offset)> = tpl
            .elements()
            .iter()
            .map(|e| {
                let offset = positions
                    .get(&(e.topic().to_owned(), e.partition()))
                    .map_or(Offset::Beginning, |&n| Offset::Offset(n));
                (e.topic().to_owned(), e.partition(), offset)
            })
            .collect();
        for (topic, partition, offset) in wanted {
            tracing::info!(kafka.topic = %topic, kafka.partition = partition, start = ?offset, "partition assigned");
            if let Err(error) = tpl.set_partition_offset(&topic, partition, offset) {
                tracing::error!(%error, "cannot set start offset");
            }
        }
    }
}

impl ClientContext for PositionContext {
    fn stats_raw(&self, statistics: &[u8]) {
        self.health.observe(statistics);
    }
}

impl ConsumerContext for PositionContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result: KafkaResult<()> = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.start_offsets(tpl);
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(kafka.partitions = ?platform::kafka::partitions_of(tpl), "partitions revoked");
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                consumer.unassign()
            }
        };
        if let Err(error) = result {
            tracing::error!(%error, "cannot apply rebalance");
        }
    }
}
