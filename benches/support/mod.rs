//! Helpers shared by the bench binaries (`mod support;` in each): key generation, where the
//! temp dirs go, latency histograms and disk accounting.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use hdrhistogram::Histogram;

/// Random 16-byte keys from a seeded splitmix64 (deterministic, no dependency).
pub struct KeyGen {
    state: u64,
}

impl KeyGen {
    /// A generator whose stream is spread from `seed`.
    pub fn new(seed: u64) -> KeyGen {
        KeyGen::from_state(seed.wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    /// A generator starting at `state` as it is.
    pub fn from_state(state: u64) -> KeyGen {
        KeyGen { state }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn next_key(&mut self) -> [u8; 16] {
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        key[8..].copy_from_slice(&self.next_u64().to_le_bytes());
        key
    }

    pub fn keys(&mut self, count: u64) -> Vec<[u8; 16]> {
        (0..count).map(|_| self.next_key()).collect()
    }
}

/// Parent of the temp dirs: `IDEMSTORE_BENCH_DIR`, else the system temp dir.
pub fn bench_parent_dir() -> PathBuf {
    std::env::var_os("IDEMSTORE_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from)
}

/// A latency histogram in nanoseconds, 1 ns to 60 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

/// A latency in whole nanoseconds for the histograms (at least 1, their lowest bound).
pub fn duration_nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

/// Bytes allocated on disk by the files under `dir` (subdirectories included).
pub fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .expect("list data dir")
        .map(|e| e.expect("dir entry"))
        .map(|e| {
            let meta = e.metadata().expect("file metadata");
            if meta.is_dir() { allocated_bytes(&e.path()) } else { meta.blocks() * 512 }
        })
        .sum()
}

/// Gives the allocator's cached free memory back to the OS (glibc only; elsewhere a no-op), so
/// RSS shows what is still allocated.
#[allow(unsafe_code, reason = "malloc_trim, with its SAFETY comment")]
pub fn trim_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes a plain integer and only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs `command` (this bench binary as a child, told its job through the environment),
/// fails loudly with its output if it fails, and parses the `RESULT key=value ...` line it
/// printed. `what` names the job in the failure message.
pub fn run_child_command(mut command: Command, what: &str) -> BTreeMap<String, f64> {
    let output = command.output().expect("start child process");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")).expect("child printed no RESULT line");
    line.split_whitespace()
        .map(|pair| {
            let (k, v) = pair.split_once('=').expect("RESULT pairs are key=value");
            (k.to_string(), v.parse().expect("RESULT values are numbers"))
        })
        .collect()
}
