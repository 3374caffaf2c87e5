//! The worker's memory budget (`IMAGE_MEMORY_LIMIT_MB`), counted in MiB.
//!
//! Two pools, so that no waiter can hold what another waiter needs (no cycle, no deadlock):
//! - **downloads**: a fetch reserves `IMAGE_FETCH_MAX_BYTES` before it starts and keeps what the body
//!   turned out to be until its image is finished;
//! - **decoding**: an image reserves the bound its header gives (`process::Plan::peak_bytes`) before
//!   any pixel is allocated, and holds it while it is decoded, resized and encoded.
//!
//! A job that waits for decoding memory holds only download memory, which decoders never wait for.
//! A fixed part of the limit is left for everything else in the process (runtime, Kafka and HTTP
//! clients, the encoded variants on their way to the store).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// MiB of the limit kept for the rest of the process.
pub const BASELINE_MIB: u32 = 96;

/// Why a budget cannot be built from the settings.
#[derive(Debug, thiserror::Error)]
#[error(
    "IMAGE_MEMORY_LIMIT_MB={limit_mib} is too small: {BASELINE_MIB} MiB for the process, \
     {download_mib} MiB for downloads (at least one IMAGE_FETCH_MAX_BYTES) and at least \
     {MIN_DECODE_MIB} MiB for decoding are needed"
)]
pub struct TooSmall {
    limit_mib: u32,
    download_mib: u32,
}

const MIN_DECODE_MIB: u32 = 64;

/// The memory budget shared by every job of a worker process.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    downloads: Arc<Semaphore>,
    decoding: Arc<Semaphore>,
    fetch_max_mib: u32,
    decode_mib: u32,
}

/// MiB needed to hold `bytes`, rounded up.
fn mib(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1 << 20)).unwrap_or(u32::MAX)
}

impl MemoryBudget {
    /// Splits `limit_mib`: the baseline, a quarter of the rest (at least two bodies of
    /// `fetch_max_bytes`) for downloads, the remainder for decoding.
    pub fn new(limit_mib: u32, fetch_max_bytes: usize) -> Result<Self, TooSmall> {
        let fetch_max_mib = mib(fetch_max_bytes as u64).max(1);
        let usable = limit_mib.saturating_sub(BASELINE_MIB);
        let download_mib = (usable / 4).max(fetch_max_mib * 2);
        let decode_mib = usable.saturating_sub(download_mib);
        if decode_mib < MIN_DECODE_MIB {
            return Err(TooSmall {
                limit_mib,
                download_mib,
            });
        }
        Ok(Self {
            downloads: Arc::new(Semaphore::new(download_mib as usize)),
            decoding: Arc::new(Semaphore::new(decode_mib as usize)),
            fetch_max_mib,
            decode_mib,
        })
    }

    /// MiB one image may use for decoding at most.
    pub fn decode_mib(&self) -> u32 {
        self.decode_mib
    }

    /// Waits for room for one download of the largest allowed body.
    pub async fn download(&self) -> Download {
        Download(
            self.downloads
                .clone()
                .acquire_many_owned(self.fetch_max_mib)
                .await
                .expect("the budget's semaphores never close"),
        )
    }

    /// Waits for `bytes` of decoding memory. `None` when that is more than the whole decoding budget
    /// (the image can never be decoded by this worker).
    pub async fn decoding(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let need = mib(bytes).max(1);
        if need > self.decode_mib {
            return None;
        }
        Some(
            self.decoding
                .clone()
                .acquire_many_owned(need)
                .await
                .expect("the budget's semaphores never close"),
        )
    }
}

/// Download memory held for one image.
#[derive(Debug)]
pub struct Download(OwnedSemaphorePermit);

impl Download {
    /// Gives back what a body of `len` bytes does not need.
    pub fn shrink_to(&mut self, len: usize) {
        let keep = mib(len as u64).max(1) as usize;
        if self.0.num_permits() > keep {
            let excess = self.0.num_permits() - keep;
            drop(self.0.split(excess));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn downloads_shrink_to_their_body_and_decoding_waits_for_room() {
        let budget = MemoryBudget::new(1024, 20 << 20).unwrap();
        assert_eq!(
            budget.decode_mib(),
            1024 - BASELINE_MIB - (1024 - BASELINE_MIB) / 4
        );
        let total = budget.downloads.available_permits();
        let mut d = budget.download().await;
        assert_eq!(budget.downloads.available_permits(), total - 20);
        d.shrink_to(3 << 20);
        assert_eq!(budget.downloads.available_permits(), total - 3);
        drop(d);
        assert_eq!(budget.downloads.available_permits(), total);

        assert!(
            budget
                .decoding(u64::from(budget.decode_mib() + 1) << 20)
                .await
                .is_none()
        );
        let all = budget
            .decoding(u64::from(budget.decode_mib()) << 20)
            .await
            .unwrap();
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(50), budget.decoding(1)).await;
        assert!(waiting.is_err(), "a full budget makes the next image wait");
        drop(all);
        assert!(budget.decoding(1).await.is_some());
    }

    #[test]
    fn a_limit_without_room_to_decode_is_refused() {
        assert!(MemoryBudget::new(190, 20 << 20).is_err());
        assert!(MemoryBudget::new(256, 20 << 20).is_ok());
    }
}
