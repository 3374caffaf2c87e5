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
    }
    Ok(())
}
