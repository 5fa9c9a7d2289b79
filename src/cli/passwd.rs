//! Where `fieldmq passwd` gets the new password when none is given on the command line or in
//! `FIELDMQ_NEW_PASSWORD`: asked twice on the terminal without echo (as `mosquitto_passwd`
//! does), or one line from standard input when that is not a terminal, so scripts can pipe
//! it in.

use std::io::BufRead;

/// The longest password a client can send: MQTT's CONNECT carries it with a 16-bit length.
pub const MAX_PASSWORD_BYTES: usize = 65_535;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("the passwords do not match; nothing written")]
    Mismatch,
    #[error("the password is empty; nothing written")]
    Empty,
    #[error("no password on standard input (pipe one line, or give it as an argument)")]
    NoInput,
    #[error("the password is longer than {MAX_PASSWORD_BYTES} bytes, the most MQTT can carry")]
    TooLong,
    #[error("the password on standard input is not UTF-8")]
    NotUtf8,
    #[error("cannot read the password: {0}")]
    Io(#[from] std::io::Error),
}

/// Ask twice through `ask` (called with the prompt, returns what was typed without the line
/// end) and return the password when both answers agree and are not empty.
pub fn prompt_twice(
    mut ask: impl FnMut(&str) -> std::io::Result<String>,
) -> Result<String, PasswordError> {
    let first = ask("Password: ")?;
    if first.is_empty() {
        return Err(PasswordError::Empty);
    }
    if first.len() > MAX_PASSWORD_BYTES {
        return Err(PasswordError::TooLong);
    }
    let second = ask("Reenter password: ")?;
    if first != second {
        return Err(PasswordError::Mismatch);
    }
    Ok(first)
}

/// The first line of `input` without its line end (`\n` or `\r\n`); reads no more than a
/// password can be long, so an endless stream cannot fill memory.
pub fn read_line(input: impl BufRead) -> Result<String, PasswordError> {
    // Room for the longest password and its "\r\n", plus one byte to tell a longer one.
    let limit = (MAX_PASSWORD_BYTES + 3) as u64;
    let mut line = Vec::new();
    let read = input.take(limit).read_until(b'\n', &mut line)?;
    if read == 0 {
        return Err(PasswordError::NoInput);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
    if line.len() > MAX_PASSWORD_BYTES {
        return Err(PasswordError::TooLong);
    }
    if line.is_empty() {
        return Err(PasswordError::Empty);
    }
    String::from_utf8(line).map_err(|_| PasswordError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(list: &[&str]) -> impl FnMut(&str) -> std::io::Result<String> {
        let mut list: Vec<String> = list.iter().rev().map(|s| s.to_string()).collect();
        move |_prompt| Ok(list.pop().expect("asked no more than twice"))
    }

    #[test]
    fn two_equal_answers_give_the_password() {
        assert_eq!(
            prompt_twice(answers(&["pässwörd 1", "pässwörd 1"])).expect("agreed"),
            "pässwörd 1"
        );
    }

    #[test]
    fn different_answers_are_refused() {
        assert!(matches!(
            prompt_twice(answers(&["one", "two"])),
            Err(PasswordError::Mismatch)
        ));
    }

    #[test]
    fn an_empty_first_answer_is_refused_without_asking_again() {
        assert!(matches!(
            prompt_twice(answers(&[""])),
            Err(PasswordError::Empty)
        ));
    }

    #[test]
    fn a_line_loses_its_line_end_but_keeps_inner_and_outer_spaces() {
        assert_eq!(read_line(&b" a b \r\nnext\n"[..]).expect("line"), " a b ");
        assert_eq!(
            read_line(&b"last line without end"[..]).expect("line"),
            "last line without end"
        );
    }

    #[test]
    fn empty_missing_oversized_and_non_utf8_input_is_refused() {
        assert!(matches!(read_line(&b""[..]), Err(PasswordError::NoInput)));
        assert!(matches!(read_line(&b"\n"[..]), Err(PasswordError::Empty)));
        assert!(matches!(
            read_line(&b"\xff\xfe\n"[..]),
            Err(PasswordError::NotUtf8)
        ));
        let longest = vec![b'x'; MAX_PASSWORD_BYTES];
        assert_eq!(
            read_line(&longest[..]).expect("fits").len(),
            MAX_PASSWORD_BYTES
        );
        let too_long = vec![b'x'; MAX_PASSWORD_BYTES + 1];
        assert!(matches!(
            read_line(&too_long[..]),
            Err(PasswordError::TooLong)
        ));
        // An endless stream is not read to its end.
        let endless = std::io::repeat(b'x');
        assert!(matches!(
            read_line(std::io::BufReader::new(endless)),
            Err(PasswordError::TooLong)
        ));
    }
}
