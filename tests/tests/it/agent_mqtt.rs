//! The Mosquitto helper the agent's MQTT tests rely on: a real broker on a free port that
//! speaks MQTT 3.1.1, comes back on the same port after a restart, and is gone after drop.
//!
//! The pipeline's own MQTT round trip (records in, decisions out, across a broker restart)
//! lives in `edge-agent/tests/pipeline.rs` beside its other tests, which includes this helper
//! by path.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use llmchain_tests::mosquitto::Mosquitto;

/// Sends an MQTT 3.1.1 CONNECT and returns the CONNACK's return code.
fn connect(broker: &Mosquitto) -> u8 {
    let mut s = TcpStream::connect(broker.addr()).expect("connect to the broker");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // CONNECT: protocol "MQTT" level 4, clean session, keep-alive 60 s, client id "t".
    s.write_all(&[0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b't']).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).expect("CONNACK");
    assert_eq!(&ack[..2], &[0x20, 2], "a CONNACK packet");
    ack[3]
}

#[test]
fn mosquitto_accepts_restarts_and_stops() {
    let mut broker = Mosquitto::start();
    assert_eq!(connect(&broker), 0, "accepted");
    assert!(broker.url("a/b").ends_with(&format!(":{}/a/b", broker.port())));

    broker.restart();
    assert_eq!(connect(&broker), 0, "accepted after a restart on the same port");

    let addr = broker.addr();
    drop(broker);
    assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(), "killed on drop");
}
