//! Consumer lag (`catalogctl lag`): how far each consumer group is behind the end of each partition it reads, and
//! which member holds the partition.

use std::collections::HashMap;
use std::time::Duration;

use crate::config::{DbConfig, KafkaConfig};
use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

/// One partition of one group.
#[derive(Debug, Clone)]
pub struct Row {
    /// Consumer group.
    pub group: String,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset of the next message to be written (the high watermark).
    pub end: i64,
    /// Next offset the group will read (`None`: it has read nothing of this partition yet).
    pub position: Option<i64>,
    /// Where `position` comes from: `postgres` (the projector's stored offsets, exact) or `kafka`
    /// (the group's committed offset).
    pub source: &'static str,
    /// The member that holds the partition now (its member id, which on Apache Kafka begins with the
    /// client id, and `@host` when the broker knows it), when the broker says.
    pub owner: Option<String>,
}

impl Row {
    /// Messages not yet consumed.
    pub fn lag(&self) -> i64 {
        (self.end - self.position.unwrap_or(0)).max(0)
    }
}

/// Failures of the lag command.
#[derive(Debug, thiserror::Error)]
pub enum LagError {
    /// The broker did not answer.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// PostgreSQL did not answer (the projector's positions are read there).
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    /// A query failed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection could be had.
    #[error("postgres pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// The lag of `groups` over `topics`; `projector_group`'s position is read from PostgreSQL (where it
/// is exact) and the others' from their committed offsets. A group that has committed nothing on a
/// topic is listed only for the topics it is expected to read (see `expected`).
pub async fn lag(
    kafka: &KafkaConfig,
    db: &DbConfig,
    projector_group: &str,
    groups: &[(String, Vec<String>)],
) -> Result<Vec<Row>, LagError> {
    let pool = crate::db::pool(db)?;
    let stored =
        crate::read_model::stored_positions(&pool.get().await?, None, projector_group).await?;
    let kafka = kafka.clone();
    let projector_group = projector_group.to_owned();
    let groups = groups.to_vec();
    let rows = tokio::task::spawn_blocking(move || {
        broker_rows(&kafka, &projector_group, &groups, &stored)
    })
    .await
    .expect("lag task does not panic")?;
    Ok(rows)
}

fn broker_rows(
    kafka: &KafkaConfig,
    projector_group: &str,
    groups: &[(String, Vec<String>)],
    stored: &HashMap<(String, i32), i64>,
) -> Result<Vec<Row>, LagError> {
    let timeout = Duration::from_secs(10);
    let mut rows = Vec::new();
    for (group, topics) in groups {
        let consumer = crate::kafka::consumer(kafka, group, "catalogctl-lag")?;
        let owners = owners(&consumer, group, timeout);
        let mut tpl = TopicPartitionList::new();
        let mut ends = HashMap::new();
        for topic in topics {
            let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
            for t in metadata.topics() {
                for p in t.partitions() {
                    let (_, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
                    ends.insert((topic.clone(), p.id()), high);
                    tpl.add_partition(topic, p.id());
                }
            }
        }
        let committed = consumer.committed_offsets(tpl, timeout)?;
        for element in committed.elements() {
            let key = (element.topic().to_owned(), element.partition());
            let (position, source) = if group == projector_group {
                (stored.get(&key).copied(), "postgres")
            } else {
                let position = match element.offset() {
                    Offset::Offset(n) => Some(n),
                    _ => None,
                };
                (position, "kafka")
            };
            rows.push(Row {
                group: group.clone(),
                topic: key.0.clone(),
                partition: key.1,
                end: ends.get(&key).copied().unwrap_or(0),
                position,
                source,
                owner: owners.get(&key).cloned(),
            });
        }
    }
    rows.sort_by(|a, b| (&a.group, &a.topic, a.partition).cmp(&(&b.group, &b.topic, b.partition)));
    Ok(rows)
}

/// Which member holds each partition, from the group's description (empty when the broker does not
/// describe groups or the group has no members).
fn owners(
    consumer: &impl Consumer<crate::kafka::WatchedContext>,
    group: &str,
    timeout: Duration,
) -> HashMap<(String, i32), String> {
    let mut owners = HashMap::new();
    let Ok(list) = consumer.fetch_group_list(Some(group), timeout) else {
        return owners;
    };
    for info in list.groups() {
        for member in info.members() {
            let Some(assignment) = member.assignment() else {
                continue;
            };
            let who = match member.client_host() {
                "" => member.id().to_owned(),
                host => format!("{}@{host}", member.id()),
            };
            for (topic, partition) in parse_assignment(assignment).unwrap_or_default() {
                owners.insert((topic, partition), who.clone());
            }
        }
    }
    owners
}

/// Reads a consumer-protocol assignment: version (i16), then topics (i32 count; each a string with an
/// i16 length and its partitions as an i32 count of i32), then user data (ignored).
pub fn parse_assignment(bytes: &[u8]) -> Option<Vec<(String, i32)>> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let slice = bytes.get(at..at + n)?;
        at += n;
        Some(slice)
    };
    let _version = i16::from_be_bytes(take(2)?.try_into().ok()?);
    let topics = i32::from_be_bytes(take(4)?.try_into().ok()?);
    let mut out = Vec::new();
    for _ in 0..topics.max(0) {
        let len = i16::from_be_bytes(take(2)?.try_into().ok()?);
        let topic = String::from_utf8(take(usize::try_from(len).ok()?)?.to_vec()).ok()?;
        let partitions = i32::from_be_bytes(take(4)?.try_into().ok()?);
        for _ in 0..partitions.max(0) {
            out.push((topic.clone(), i32::from_be_bytes(take(4)?.try_into().ok()?)));
        }
    }
    Some(out)
}

/// Prints `rows` as a table.
pub fn print(rows: &[Row]) {
    println!(
        "{:<32} {:<36} {:>9} {:>10} {:>10} {:>8}  {:<8} OWNER",
        "GROUP", "TOPIC", "PARTITION", "END", "POSITION", "LAG", "SOURCE"
    );
    for row in rows {
        println!(
            "{:<32} {:<36} {:>9} {:>10} {:>10} {:>8}  {:<8} {}",
            row.group,
            row.topic,
            row.partition,
            row.end,
            row.position
                .map_or_else(|| "-".to_owned(), |p| p.to_string()),
            row.lag(),
            row.source,
            row.owner.as_deref().unwrap_or("-")
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_assignment_is_read_and_garbage_is_not() {
        let mut bytes = vec![0, 1, 0, 0, 0, 1, 0, 3];
        bytes.extend(b"abc");
        bytes.extend([0, 0, 0, 2, 0, 0, 0, 4, 0, 0, 0, 7, 0, 0, 0, 0]);
        assert_eq!(
            super::parse_assignment(&bytes),
            Some(vec![("abc".to_owned(), 4), ("abc".to_owned(), 7)])
        );
        assert_eq!(super::parse_assignment(&bytes[..9]), None);
        assert_eq!(super::parse_assignment(&[]), None);
    }
}
