//! The birth/death sequence number (`bdSeq`) of an edge node, persisted in
//! `<data_dir>/sparkplug-<uplink>.bdseq` so that it goes on counting across restarts.
//!
//! Each MQTT CONNECT takes the next number: it goes into the will (NDEATH) of that
//! connection and into the NBIRTH that follows it, so a host application can tell which
//! birth a death belongs to. The file holds the number the next CONNECT takes, as decimal
//! text; it is replaced atomically (write a temporary file, fsync, rename), so a crash
//! leaves either the old or the new number, never a torn one.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The file of one uplink's bdSeq: `<data_dir>/sparkplug-<uplink>.bdseq` (characters
/// other than letters, digits, `-`, `_` and `.` in the name become `_`).
pub fn bdseq_path(data_dir: &Path, uplink: &str) -> PathBuf {
    data_dir.join(format!(
        "sparkplug-{}.bdseq",
        crate::uplink::file_safe(uplink)
    ))
}

/// The persisted counter.
#[derive(Debug, Clone)]
pub struct BdSeqFile {
    path: PathBuf,
}

impl BdSeqFile {
    pub fn new(path: PathBuf) -> BdSeqFile {
        BdSeqFile { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The number stored for the next CONNECT: 0 when there is no file, and 0 (with a
    /// warning) when the file does not hold a number from 0 to 255.
    pub fn peek(&self) -> u8 {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => match text.trim().parse::<u8>() {
                Ok(value) => value,
                Err(_) => {
                    tracing::warn!(file = %self.path.display(), "the bdSeq file does not hold a number from 0 to 255; starting again at 0");
                    0
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot read the bdSeq file; starting again at 0");
                0
            }
        }
    }

    /// Take the number for a new CONNECT and store its successor (255 wraps to 0). A failed
    /// write is logged: the number is used anyway (the next start may repeat it).
    pub fn take(&self) -> u8 {
        let value = self.peek();
        if let Err(e) = self.store(value.wrapping_add(1)) {
            tracing::warn!(file = %self.path.display(), error = %e, "cannot write the bdSeq file");
        }
        value
    }

    fn store(&self, value: u8) -> std::io::Result<()> {
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            let mut file = std::fs::File::create(&tmp)?;
            writeln!(file, "{value}")?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            if let Ok(dir) = std::fs::File::open(dir) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdseq_counts_across_instances_and_wraps_after_255() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = bdseq_path(dir.path(), "sp/1");
        assert!(path.ends_with("sparkplug-sp_1.bdseq"));
        let file = BdSeqFile::new(path.clone());
        assert_eq!(file.take(), 0);
        assert_eq!(file.take(), 1);
        // A new instance (a restart) goes on from the file.
        let again = BdSeqFile::new(path.clone());
        assert_eq!(again.peek(), 2);
        std::fs::write(&path, "255\n").expect("write");
        assert_eq!(again.take(), 255);
        assert_eq!(again.take(), 0);
    }

    #[test]
    fn a_damaged_bdseq_file_starts_again_at_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = bdseq_path(dir.path(), "sp");
        std::fs::write(&path, "not a number").expect("write");
        let file = BdSeqFile::new(path);
        assert_eq!(file.take(), 0);
        assert_eq!(file.take(), 1);
    }
}
