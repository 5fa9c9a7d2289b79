//! Mosquitto-compatible auth and ACL: the ACL file's rules as a table, then a password
//! file made by the real `mosquitto_passwd` and an ACL file used unchanged by the broker
//! (denied subscribe: SUBACK 0x80 in 3.1.1, 0x87 in 5; denied publish: dropped, and
//! acknowledged 0x87 in 5; delivery only of what the subscriber may read), and a client
//! certificate's CN used as the username.

use fieldmq::broker::Acl;

use std::path::{Path, PathBuf};
use std::process::Command;

use fieldmq::broker::config::DeniedReason;
use fieldmq::model::{Message, QoS};
use mqtt::packet::{self, Connect};
use mqtt::{within, Client, Raw, TestBroker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::util::{mqtt, pki, skip};

/// An ACL file as Mosquitto users write it.
const ACL_FILE: &str = "\
# fieldmq reads Mosquitto's acl_file format unchanged.
# Anonymous clients (no user line yet): read the public tree.
topic read public/#

user alice
topic readwrite plant/#
topic deny plant/secret/#

user bob
topic read plant/#

user sensor-1
topic readwrite sensors/#

# Every client may use its own tree.
pattern readwrite clients/%c/#
pattern read inbox/%u/#
";

#[derive(Debug, Clone, Copy)]
enum Op {
    Subscribe,
    Publish,
    Receive,
}

#[test]
fn the_acl_file_rules_as_mosquitto_applies_them() {
    let acl = Acl::parse(ACL_FILE).expect("the ACL file parses");
    use Op::*;
    let table: &[(Option<&str>, &str, Op, &str, bool)] = &[
        (None, "anon", Receive, "public/news", true),
        (None, "anon", Subscribe, "public/#", true),
        (None, "anon", Subscribe, "#", false),
        (None, "anon", Publish, "public/news", false),
        (None, "anon", Publish, "clients/anon/state", true),
        (None, "anon", Receive, "inbox/anon/x", false),
        (Some("alice"), "a1", Subscribe, "plant/#", true),
        (Some("alice"), "a1", Subscribe, "plant/+/temperature", true),
        (Some("alice"), "a1", Subscribe, "#", false),
        (Some("alice"), "a1", Subscribe, "plant/secret/#", false),
        (
            Some("alice"),
            "a1",
            Publish,
            "plant/line1/temperature",
            true,
        ),
        (Some("alice"), "a1", Publish, "plant/secret/recipe", false),
        (Some("alice"), "a1", Receive, "plant/secret/recipe", false),
        (Some("alice"), "a1", Receive, "public/news", false),
        (Some("alice"), "a1", Publish, "clients/a1/state", true),
        (Some("alice"), "a1", Publish, "clients/b1/state", false),
        (Some("alice"), "a1", Receive, "inbox/alice/1", true),
        (Some("alice"), "a1", Publish, "inbox/alice/1", false),
        (Some("bob"), "b1", Subscribe, "plant/#", true),
        (Some("bob"), "b1", Publish, "plant/line1/temperature", false),
        (Some("bob"), "b1", Subscribe, "other/#", false),
        (Some("bob"), "b+", Publish, "clients/b+/state", false),
        (Some("sensor-1"), "s", Publish, "sensors/t", true),
        (
            Some("mallory"),
            "m",
            Receive,
            "plant/line1/temperature",
            false,
        ),
    ];
    let mut wrong = Vec::new();
    for &(user, client, op, topic, expected) in table {
        let got = match op {
            Subscribe => acl.can_subscribe(user, client, topic),
            Publish => acl.can_publish(user, client, topic),
            Receive => acl.can_receive(user, client, topic),
        };
        if got != expected {
            wrong.push(format!(
                "{user:?} ({client}) {op:?} {topic}: expected {expected}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    let (line, reason) = Acl::parse("user alice\ntopic readonly plant/#\n").expect_err("bad");
    assert_eq!(line, 2, "{reason}");
}

// ---------------------------------------------------------------------------------------
// The broker with Mosquitto's files
// ---------------------------------------------------------------------------------------

/// `mosquitto_passwd` from the `mosquitto` package; `None` (`test` skipped, see
/// tests/it/util/skip.rs) when it is not installed, and a failure under CI, where it must be.
fn mosquitto_passwd(test: &str) -> Option<PathBuf> {
    skip::tool_on_path(test, "mosquitto_passwd", "apt-get install mosquitto")
}

fn run(tool: &Path, args: &[&str]) {
    let status = Command::new(tool)
        .args(args)
        .status()
        .expect("run mosquitto_passwd");
    assert!(status.success(), "mosquitto_passwd {args:?} failed");
}

/// A broker with a password file made by `mosquitto_passwd` (alice, bob) and the ACL
/// file above; anonymous clients refused. `tls` adds a TLS listener with client
/// certificates whose CN is the username.
async fn start(tool: &Path, dir: &Path, tls: Option<&pki::Pki>) -> TestBroker {
    let passwd = dir.join("passwd");
    let passwd_s = passwd.to_str().expect("UTF-8 path");
    run(tool, &["-c", "-b", passwd_s, "alice", "alice-pw"]);
    run(tool, &["-b", passwd_s, "bob", "bob-pw"]);
    let acl = dir.join("acl");
    std::fs::write(&acl, ACL_FILE).expect("write ACL file");

    let mut config = mqtt::config();
    config.allow_anonymous = false;
    config.password_file = Some(passwd);
    config.acl_file = Some(acl);
    if let Some(pki) = tls {
        let mut listener_tls = pki.listener_tls(true, true);
        listener_tls.identity_as_username = true;
        config.listeners = vec![pki::listener(Some(listener_tls), false)];
    }
    mqtt::start(config).await
}

fn login<'a>(connect: Connect<'a>, user: &'a str, password: &'a str) -> Connect<'a> {
    Connect {
        username: Some(user),
        password: Some(password),
        ..connect
    }
}

/// Subscribe to one filter with raw packets; the SUBACK's return or reason code.
async fn raw_subscribe(raw: &mut Raw, v5: bool, pkid: u16, filter: &str) -> u8 {
    raw.send(&packet::subscribe(v5, pkid, &[(filter, 1)])).await;
    let suback = raw.recv().await.expect("SUBACK");
    assert_eq!(suback.kind(), 9, "expected SUBACK, got {suback:?}");
    let body = suback.body();
    assert_eq!(u16::from_be_bytes([body[0], body[1]]), pkid);
    // MQTT 5: a property length (0 here) before the reason codes.
    let codes = if v5 { &body[3..] } else { &body[2..] };
    codes[0]
}

#[tokio::test]
async fn a_denied_subscription_gets_a_failure_suback() {
    let Some(tool) = mosquitto_passwd("a_denied_subscription_gets_a_failure_suback") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = start(&tool, dir.path(), None).await;

    let connect = login(Connect::v311("alice-3"), "alice", "alice-pw");
    let mut v3 = Raw::connected(broker.addr, &connect).await;
    assert_eq!(raw_subscribe(&mut v3, false, 1, "plant/#").await, 1);
    assert_eq!(raw_subscribe(&mut v3, false, 2, "#").await, 0x80);
    assert_eq!(
        raw_subscribe(&mut v3, false, 3, "plant/secret/#").await,
        0x80
    );

    let connect = login(Connect::v5("bob-5"), "bob", "bob-pw");
    let mut v5 = Raw::connected(broker.addr, &connect).await;
    assert_eq!(raw_subscribe(&mut v5, true, 1, "plant/#").await, 1);
    assert_eq!(raw_subscribe(&mut v5, true, 2, "other/#").await, 0x87);

    // With rumqttc too: a failure code, and the connection goes on.
    let mut options = Client::options_v5(broker.addr, "bob-rumqttc");
    options.set_credentials("bob", "bob-pw");
    let (mut bob, _) = Client::connect_v5(options).await;
    assert_eq!(bob.subscribe("#", 1).await, None);
    assert_eq!(bob.subscribe("plant/+/temperature", 1).await, Some(1));
}

#[tokio::test]
async fn mqtt5_clients_that_expect_0x80_for_a_denied_subscription_can_have_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "topic readwrite #\ntopic deny test/nosubscribe\n").expect("write ACL");
    let mut config = mqtt::config();
    config.allow_anonymous = true;
    config.acl_file = Some(acl);
    config.subscribe_denied_reason = DeniedReason::Unspecified;
    let broker = mqtt::start(config).await;

    let mut v5 = Raw::connected(broker.addr, &Connect::v5("expects-0x80")).await;
    assert_eq!(
        raw_subscribe(&mut v5, true, 1, "test/nosubscribe").await,
        0x80
    );
    assert_eq!(raw_subscribe(&mut v5, true, 2, "test/other").await, 1);
    let mut v3 = Raw::connected(broker.addr, &Connect::v311("v3-client")).await;
    assert_eq!(
        raw_subscribe(&mut v3, false, 1, "test/nosubscribe").await,
        0x80
    );
}

#[tokio::test]
async fn a_denied_publish_is_dropped_and_delivery_needs_read_access() {
    let Some(tool) = mosquitto_passwd("a_denied_publish_is_dropped_and_delivery_needs_read_access")
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = start(&tool, dir.path(), None).await;

    let mut options = Client::options_v3(broker.addr, "alice");
    options.set_credentials("alice", "alice-pw");
    let (mut alice, _) = Client::connect_v3(options).await;
    assert_eq!(alice.subscribe("plant/#", 1).await, Some(1));

    // bob may only read plant/#: his QoS 1 publish is acknowledged 0x87 (MQTT 5) and
    // goes nowhere.
    let connect = login(Connect::v5("bob-5"), "bob", "bob-pw");
    let mut bob5 = Raw::connected(broker.addr, &connect).await;
    bob5.send(&packet::publish(
        true,
        b"plant/line1/temperature",
        1,
        false,
        5,
        b"bob5",
    ))
    .await;
    let puback = bob5.recv().await.expect("PUBACK");
    assert_eq!(puback.kind(), 4, "expected PUBACK, got {puback:?}");
    assert_eq!(&puback.body()[..3], &[0, 5, 0x87]);

    // In 3.1.1 there is no reason code: acknowledged (so the client does not resend)
    // and dropped.
    let connect = login(Connect::v311("bob-3"), "bob", "bob-pw");
    let mut bob3 = Raw::connected(broker.addr, &connect).await;
    bob3.send(&packet::publish(
        false,
        b"plant/line1/temperature",
        1,
        false,
        6,
        b"bob3",
    ))
    .await;
    let puback = bob3.recv().await.expect("PUBACK");
    assert_eq!(puback.kind(), 4, "expected PUBACK, got {puback:?}");
    bob3.send(&packet::publish(
        false,
        b"plant/line1/temperature",
        0,
        false,
        0,
        b"bob3-qos0",
    ))
    .await;
    // Whatever bob sent has been handled once the broker answers his pings.
    assert!(bob3.until_ping_barrier().await.is_empty());

    // alice subscribed to plant/# but may not read plant/secret/#: an internal
    // publisher's message there (internal publishers are not subject to the ACL) is not
    // delivered to her.
    broker
        .handle
        .publish_and_wait(Message::internal(
            "test",
            "plant/secret/recipe",
            "secret",
            QoS::AtLeastOnce,
            false,
        ))
        .await
        .expect("internal publish");
    alice.publish("plant/sentinel", 1, false, b"end").await;
    let before = alice.recv_until("plant/sentinel").await;
    assert!(
        before.is_empty(),
        "alice received what she should not: {before:?}"
    );

    // An allowed publish still flows, and patterns work (%c).
    let connect = login(Connect::v311("alice-raw"), "alice", "alice-pw");
    let mut alice_raw = Raw::connected(broker.addr, &connect).await;
    assert_eq!(
        raw_subscribe(&mut alice_raw, false, 1, "clients/alice-raw/#").await,
        1
    );
    assert_eq!(
        raw_subscribe(&mut alice_raw, false, 2, "clients/bob-3/#").await,
        0x80
    );
    alice
        .publish("plant/line2/pressure", 1, false, b"2.1")
        .await;
    let got = alice.recv().await;
    assert_eq!(got.topic, "plant/line2/pressure");
}

#[tokio::test]
async fn anonymous_clients_are_refused_with_a_password_file() {
    let Some(tool) = mosquitto_passwd("anonymous_clients_are_refused_with_a_password_file") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = start(&tool, dir.path(), None).await;
    let (_, connack) = Raw::connect(broker.addr, &Connect::v311("anon")).await;
    assert_eq!(connack.connack(), (false, 5), "3.1.1 not authorized");
    let wrong = login(Connect::v5("mallory"), "alice", "wrong");
    let (_, connack) = Raw::connect(broker.addr, &wrong).await;
    assert_eq!(
        connack.connack(),
        (false, 0x86),
        "MQTT 5 bad user name or password"
    );
}

/// Over TLS: CONNECT without username, then one SUBSCRIBE; (CONNACK code, SUBACK code).
async fn tls_session(
    addr: std::net::SocketAddr,
    pki: &pki::Pki,
    identity: Option<&pki::Identity>,
) -> Result<(u8, u8), String> {
    within("a TLS client", async {
        let mut stream = pki::connect(addr, pki.client_config(identity))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        stream
            .write_all(&Connect::v311("cert-client").encode())
            .await
            .map_err(|e| e.to_string())?;
        let mut connack = [0u8; 4];
        stream
            .read_exact(&mut connack)
            .await
            .map_err(|e| format!("CONNACK: {e}"))?;
        if connack[3] != 0 {
            return Ok((connack[3], 0));
        }
        stream
            .write_all(&packet::subscribe(false, 1, &[("sensors/#", 1)]))
            .await
            .map_err(|e| e.to_string())?;
        let mut suback = [0u8; 5];
        stream
            .read_exact(&mut suback)
            .await
            .map_err(|e| format!("SUBACK: {e}"))?;
        Ok((connack[3], suback[4]))
    })
    .await
}

#[tokio::test]
async fn a_client_certificate_cn_is_the_username() {
    let Some(tool) = mosquitto_passwd("a_client_certificate_cn_is_the_username") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki::Pki::new();
    let broker = start(&tool, dir.path(), Some(&pki)).await;
    // CN sensor-1, no username or password in CONNECT: accepted as user sensor-1, whose
    // ACL lines allow sensors/#.
    let session = tls_session(broker.addr, &pki, Some(&pki.client)).await;
    assert_eq!(session, Ok((0, 1)));
    // A certificate from another CA never gets to MQTT.
    let stranger = tls_session(broker.addr, &pki, Some(&pki.stranger)).await;
    assert!(stranger.is_err(), "{stranger:?}");
}
