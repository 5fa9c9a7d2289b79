//! Username/password authentication from a Mosquitto-format password file, so a file made
//! by `mosquitto_passwd` works unchanged.
//!
//! Lines are `username:hash`. Supported hashes: `$7$iterations$salt$hash` (PBKDF2-HMAC-
//! SHA512, Mosquitto 2.x) and `$6$salt$hash` (SHA512 of password then salt, Mosquitto 1.x).
//! Salts and hashes are standard base64.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

/// Iterations for new `$7$` hashes (Mosquitto's default).
const DEFAULT_ITERATIONS: u32 = 101;
const SALT_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read password file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    BadLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Hash {
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

#[derive(Debug, Clone, Default)]
pub struct PasswordFile {
    users: HashMap<String, Hash>,
}

impl PasswordFile {
    pub fn load(path: &Path) -> Result<PasswordFile, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|(line, reason)| AuthError::BadLine {
            path: path.to_owned(),
            line,
            reason,
        })
    }

    /// Parse the file's text; errors carry the 1-based line number.
    pub fn parse(text: &str) -> Result<PasswordFile, (usize, String)> {
        let mut users = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| (index + 1, "expected `username:hash`".to_owned()))?;
            let hash = parse_hash(hash).map_err(|reason| (index + 1, reason))?;
            users.insert(user.to_owned(), hash);
        }
        Ok(PasswordFile { users })
    }

    pub fn verify(&self, username: &str, password: &str) -> bool {
        match self.users.get(username) {
            Some(Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            }) => {
                let computed = pbkdf2_sha512(password, salt, *iterations, hash.len());
                computed.ct_eq(hash).into()
            }
            Some(Hash::Sha512 { salt, hash }) => {
                let mut digest = Sha512::new();
                digest.update(password.as_bytes());
                digest.update(salt);
                digest.finalize().as_slice().ct_eq(hash).into()
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// A `$7$` line for `username` (what `fieldmq passwd` writes).
pub fn hash_password(username: &str, password: &str) -> String {
    let salt: [u8; SALT_LEN] = rand::random();
    let hash = pbkdf2_sha512(password, &salt, DEFAULT_ITERATIONS, 64);
    format!(
        "{username}:$7${DEFAULT_ITERATIONS}${}${}",
        BASE64.encode(salt),
        BASE64.encode(hash)
    )
}

fn pbkdf2_sha512(password: &str, salt: &[u8], iterations: u32, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    pbkdf2::pbkdf2_hmac::<Sha512>(password.as_bytes(), salt, iterations, &mut out);
    out
}

fn parse_hash(text: &str) -> Result<Hash, String> {
    let decode = |part: &str, what: &str| {
        BASE64
            .decode(part)
            .map_err(|e| format!("{what} is not valid base64: {e}"))
    };
    let parts: Vec<&str> = text.split('$').collect();
    match parts.as_slice() {
        ["", "7", iterations, salt, hash] => Ok(Hash::Pbkdf2 {
            iterations: iterations
                .parse()
                .map_err(|_| format!("bad iteration count {iterations:?}"))?,
            salt: decode(salt, "salt")?,
            hash: decode(hash, "hash")?,
        }),
        ["", "6", salt, hash] => Ok(Hash::Sha512 {
            salt: decode(salt, "salt")?,
            hash: decode(hash, "hash")?,
        }),
        _ => Err(
            "unsupported hash: expected Mosquitto's $7$ (PBKDF2-SHA512) or $6$ (SHA512); \
             plain-text passwords must be hashed with `fieldmq passwd`"
                .to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hashed_line_verifies_only_its_password() {
        let line = hash_password("alice", "s3cret");
        let file = PasswordFile::parse(&line).expect("parses");
        assert!(file.verify("alice", "s3cret"));
        assert!(!file.verify("alice", "wrong"));
        assert!(!file.verify("bob", "s3cret"));
    }

    #[test]
    fn sha512_lines_from_mosquitto_1_verify() {
        let salt = b"0123456789ab";
        let mut digest = Sha512::new();
        digest.update(b"pw");
        digest.update(salt);
        let line = format!(
            "u:$6${}${}",
            BASE64.encode(salt),
            BASE64.encode(digest.finalize())
        );
        let file = PasswordFile::parse(&line).expect("parses");
        assert!(file.verify("u", "pw"));
        assert!(!file.verify("u", "px"));
    }

    #[test]
    fn a_bad_line_names_its_number() {
        let err = PasswordFile::parse("# comment\nalice:plaintext\n").expect_err("refused");
        assert_eq!(err.0, 2);
    }
}
