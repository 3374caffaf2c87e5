//! `catalogctl`: operator commands for the catalog (migrations, topics).

use clap::{Parser, Subcommand};
use platform::config::{DbConfig, KafkaConfig, LogConfig};

#[derive(Parser)]
#[command(name = "catalogctl", about = "Operator commands for the catalog")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogConfig,
}

#[derive(Subcommand)]
enum Command {
    /// Create the database if missing and apply pending migrations from `sql/`.
    Migrate {
        /// Drop the schema first (development: everything in it is lost).
        #[arg(long)]
        reset: bool,
        #[command(flatten)]
        db: DbConfig,
    },
    /// Create the event topics if missing (infinite retention).
    Topics {
        #[command(flatten)]
        kafka: KafkaConfig,
    },
    /// Rebuild the projection from offset 0 of the event topics.
    ///
    /// By default side by side: a fresh schema is filled while the live projection keeps serving, then
    /// reads switch to it atomically once it has caught up, changed cache entries are invalidated and
    /// the old rows retired. `--in-place` empties and refills the live tables (development; stop the
    /// projector first).
    Replay {
        /// Empty and refill the live tables instead of rebuilding beside them.
        #[arg(long)]
        in_place: bool,
        /// Rebuild beside the live tables but do not switch; print the differences and keep the schema.
        #[arg(long, conflicts_with = "in_place")]
        no_switch: bool,
        /// The live projector's consumer group (whose offsets mark the live position).
        #[arg(long, env = "PROJECTOR_GROUP_ID", default_value = "catalog-projector")]
        group_id: String,
        /// Events per transaction.
        #[arg(long, default_value_t = 500)]
        batch_size: usize,
        #[command(flatten)]
        kafka: KafkaConfig,
        #[command(flatten)]
        db: DbConfig,
        #[command(flatten)]
        cache: platform::cache::CacheConfig,
    },
    /// Print each consumer group's lag per partition (end offset, position, lag, owner).
    ///
    /// The projector's position is read from PostgreSQL, where it is exact; the others' from their
    /// committed offsets. `--watch` reprints every interval.
    Lag {
        /// The projector's consumer group.
        #[arg(long, env = "PROJECTOR_GROUP_ID", default_value = "catalog-projector")]
        projector_group: String,
        /// The image worker's consumer group (its retry consumer is `<group>-retry`).
        #[arg(
            long,
            env = "IMAGE_WORKER_GROUP_ID",
            default_value = "catalog-image-worker"
        )]
        image_worker_group: String,
        /// The example downstream consumer's group.
        #[arg(
            long,
            env = "USER_STATS_GROUP_ID",
            default_value = "catalog-user-stats"
        )]
        user_stats_group: String,
        /// Number of retry topics (as IMAGE_RETRY_DELAYS_MS has delays).
        #[arg(
            long,
            env = "IMAGE_RETRY_DELAYS_MS",
            value_delimiter = ',',
            default_value = "5000,30000,300000"
        )]
        retry_delays_ms: Vec<u64>,
        /// Reprint every this many seconds until interrupted.
        #[arg(long)]
        watch: Option<u64>,
        #[command(flatten)]
        kafka: KafkaConfig,
        #[command(flatten)]
        db: DbConfig,
    },
    /// Inspect and re-drive the image pipeline's dead-letter topic.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
        /// Only entries of this product.
        #[arg(long, global = true)]
        product: Option<uuid::Uuid>,
        /// Only entries of this error class (e.g. `http_4xx`, `timeout`).
        #[arg(long, global = true)]
        error_class: Option<String>,
        /// Number of retry topics (as IMAGE_RETRY_DELAYS_MS has delays).
        #[arg(
            long,
            env = "IMAGE_RETRY_DELAYS_MS",
            value_delimiter = ',',
            default_value = "5000,30000,300000",
            global = true
        )]
        retry_delays_ms: Vec<u64>,
        /// Stop reading the topic after this long without a message, in milliseconds.
        #[arg(long, default_value_t = 3000, global = true)]
        idle_ms: u64,
        #[command(flatten)]
        kafka: KafkaConfig,
        #[command(flatten)]
        db: DbConfig,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// Print the parked images, one per line.
    List,
    /// Request the selected images again (only those still failed); `--all` or a filter is required.
    Redrive {
        /// Re-drive every entry.
        #[arg(long)]
        all: bool,
    },
    /// Add every entry of the dead-letter topic to the index `list` and `redrive` read (once, for
    /// entries parked before the index existed).
    Reindex,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    platform::telemetry::init(&cli.log);
    match cli.command {
        Command::Migrate { reset, db } => {
            platform::db::ensure_database(&db).await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach PostgreSQL at DB_HOST={} DB_PORT={}: {e}",
                    db.host,
                    db.port
                )
            })?;
            if reset {
                platform::db::drop_schema(&db).await?;
            }
            let applied = platform::db::migrate(&db).await?;
            println!(
                "database {} schema {}: {} migration(s) applied",
                db.name,
                db.schema,
                applied.len()
            );
        }
        Command::Topics { kafka } => {
            platform::kafka::ensure_topics(&kafka).await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot create topics on KAFKA_BROKERS={}: {e}",
                    kafka.brokers
                )
            })?;
            println!("topics ready: {:?}", kafka.topics().all());
        }
        Command::Replay {
            in_place,
            no_switch,
            group_id,
            batch_size,
            kafka,
            db,
            cache,
        } => {
            let options = projector::replay::ReplayOptions {
                kafka,
                db: db.clone(),
                live_group: group_id,
                batch_size,
                side_by_side: !in_place,
                switch: !no_switch,
                progress: true,
                cache: Some(cache),
            };
            let report = projector::replay::replay(&options).await?;
            if report.switched {
                println!(
                    "replayed {} events; reads switched to the rebuild in {} ms ({} product(s) changed); old rows retired",
                    report.events,
                    report.switch_held.unwrap_or_default().as_millis(),
                    report.changed_products.len()
                );
            } else if no_switch {
                let pool = platform::db::pool(&db)?;
                let differences =
                    projector::replay::compare(&pool, &db.schema, &report.schema).await?;
                println!(
                    "replayed {} events into schema {}",
                    report.events, report.schema
                );
                if differences.is_empty() {
                    println!("identical to {} row for row", db.schema);
                } else {
                    for d in differences {
                        println!("difference: {d}");
                    }
                }
            } else {
                println!("replayed {} events in place", report.events);
            }
        }
        Command::Lag {
            projector_group,
            image_worker_group,
            user_stats_group,
            retry_delays_ms,
            watch,
            kafka,
            db,
        } => {
            let topics = kafka.topics();
            let pipeline = image_worker::PipelineTopics::new(&kafka, retry_delays_ms.len());
            let groups = vec![
                (
                    projector_group.clone(),
                    topics.all().map(str::to_owned).to_vec(),
                ),
                (image_worker_group.clone(), vec![topics.products.clone()]),
                (format!("{image_worker_group}-retry"), pipeline.retries),
                (user_stats_group, vec![topics.products.clone()]),
            ];
            loop {
                let rows = platform::lag::lag(&kafka, &db, &projector_group, &groups).await?;
                platform::lag::print(&rows);
                let Some(every) = watch else { break };
                tokio::time::sleep(std::time::Duration::from_secs(every.max(1))).await;
                println!();
            }
        }
        Command::Dlq {
            action,
            product,
            error_class,
            retry_delays_ms,
            idle_ms,
            kafka,
            db,
        } => {
            use image_worker::dlq;
            let filter = dlq::Filter {
                product,
                error_class,
            };
            let pool = platform::db::pool(&db)?;
            if matches!(action, DlqAction::Reindex) {
                let n = dlq::reindex(
                    &kafka,
                    retry_delays_ms.len(),
                    std::time::Duration::from_millis(idle_ms),
                    &pool,
                )
                .await?;
                println!("indexed {n} dead letter(s) of the topic");
                return Ok(());
            }
            let records = dlq::list(&pool, &filter).await?;
            match action {
                DlqAction::Reindex => unreachable!("handled above"),
                DlqAction::List => {
                    println!(
                        "{:<36}  {:>3}  {:<18}  {:>8}  {:<20}  url / reason",
                        "product", "pos", "error class", "attempts", "first failure"
                    );
                    for r in &records {
                        let l = &r.letter;
                        println!(
                            "{:<36}  {:>3}  {:<18}  {:>8}  {:<20}  {}\n{:>95}{}",
                            l.product_id,
                            l.image.position,
                            l.failure.class,
                            l.attempts,
                            l.first_failure_at.format("%Y-%m-%d %H:%M:%S"),
                            l.image.url,
                            "",
                            l.failure.message
                        );
                    }
                    println!(
                        "{} entr{}",
                        records.len(),
                        if records.len() == 1 { "y" } else { "ies" }
                    );
                }
                DlqAction::Redrive { all } => {
                    if !all && filter.product.is_none() && filter.error_class.is_none() {
                        anyhow::bail!(
                            "say what to re-drive: --all, --product ID or --error-class CLASS"
                        );
                    }
                    let progress = platform::progress::Progress::new("redrive", "products");
                    let report = dlq::redrive_with(&kafka, &pool, &records, Some(progress)).await?;
                    println!(
                        "re-driven: {} image(s) of {} product(s); skipped {} (no longer failed)",
                        report.images, report.products, report.skipped
                    );
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
