//! The broker ceiling for the write benchmark: what a bare idempotent producer (`acks=all`, the
//! services' settings) achieves when `CONNECTIONS` writers each append two events in sequence, waiting
//! for each acknowledgement, as one `POST /products` does. Prints `pairs_per_s p50_ms p99_ms`.
//!
//! Usage: produce-ceiling BROKERS TOPIC EVENT_JSON_FILE CONNECTIONS SECONDS

use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::producer::FutureRecord;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [brokers, topic, event_file, connections, seconds] = args.as_slice() else {
        anyhow::bail!("usage: produce-ceiling BROKERS TOPIC EVENT_JSON_FILE CONNECTIONS SECONDS");
    };
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        kafka: platform::config::KafkaConfig,
    }
    let cli = Cli::parse_from(["x", "--kafka-brokers", brokers]);
    let producer = platform::kafka::producer(&cli.kafka, "produce-ceiling")?;
    let payload = std::fs::read(event_file)?;
    let connections: usize = connections.parse()?;
    let until = Instant::now() + Duration::from_secs(seconds.parse()?);
    let started = Instant::now();
    let writers: Vec<_> = (0..connections)
        .map(|w| {
            let (producer, payload, topic) = (producer.clone(), payload.clone(), topic.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = 0u64;
                while Instant::now() < until {
                    let key = format!("{w}-{n}");
                    let started = Instant::now();
                    for _ in 0..2 {
                        let record = FutureRecord::to(&topic).key(&key).payload(&payload);
                        if producer
                            .send(record, Duration::from_secs(10))
                            .await
                            .is_err()
                        {
                            return latencies;
                        }
                    }
                    latencies.push(started.elapsed());
                    n += 1;
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in writers {
        all.extend(w.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let at = |q: f64| {
        all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "{:.0} {:.2} {:.2}",
        all.len() as f64 / elapsed,
        at(0.5),
        at(0.99)
    );
    Ok(())
}
