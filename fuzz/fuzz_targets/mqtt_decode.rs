//! Arbitrary bytes through the broker's packet reading, as a connection reads them: a
//! CONNECT (which picks MQTT 3.1.1 or 5) then packets of that version; and the same bytes
//! as packets of each version without a CONNECT; and the strict pre-decode checks.
#![no_main]

use bytes::BytesMut;
use fieldmq::fuzzing::{fuzz_check, fuzz_read, fuzz_read_connect, FuzzRead};
use libfuzzer_sys::fuzz_target;

/// The default broker.max_packet_size is far larger; a small one exercises the size checks.
const MAX_SIZES: [u32; 2] = [1 << 20, 64];

fn read_all(v5: bool, mut buf: BytesMut, max_size: u32) {
    loop {
        let before = buf.len();
        if let Some(len) = fuzz_check(&buf) {
            assert!(len <= buf.len());
        }
        match fuzz_read(v5, &mut buf, max_size) {
            FuzzRead::Packet => assert!(buf.len() < before, "a packet read consumed nothing"),
            FuzzRead::Incomplete => {
                assert_eq!(buf.len(), before, "an incomplete read consumed bytes");
                break;
            }
            FuzzRead::Refused => break,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    for max_size in MAX_SIZES {
        let mut buf = BytesMut::from(data);
        let (outcome, v5) = fuzz_read_connect(&mut buf, max_size);
        match outcome {
            FuzzRead::Packet => {
                assert!(buf.len() < data.len());
                read_all(v5, buf, max_size);
            }
            FuzzRead::Incomplete => assert_eq!(buf.len(), data.len()),
            FuzzRead::Refused => {}
        }
        read_all(false, BytesMut::from(data), max_size);
        read_all(true, BytesMut::from(data), max_size);
    }
});
