//! Appending JSON text without the `fmt` machinery: a trace line is mostly integers and IPv4
//! addresses, and formatting them through `write!` was the larger part of the engine's CPU per
//! trace. Integers go through `itoa`; IPv6 addresses (rarer, and with `::` compression to get
//! right) through `Display`.

use std::fmt::Write as _;
use std::net::IpAddr;

/// Chained appends to a `String` (writing to a `String` cannot fail).
pub trait Append {
    /// `s` as is.
    fn raw(&mut self, s: &str) -> &mut Self;
    /// `n` in decimal.
    fn num<N: itoa::Integer>(&mut self, n: N) -> &mut Self;
    /// `, "key":n`: the next numeric field of an object.
    fn field<N: itoa::Integer>(&mut self, key: &str, n: N) -> &mut Self;
    /// `addr` as `Display` writes it.
    fn addr(&mut self, addr: IpAddr) -> &mut Self;
    /// `whole.frac` with `frac` on three digits (a millisecond count with microseconds).
    fn millis(&mut self, micros: u64) -> &mut Self;
}

impl Append for String {
    fn raw(&mut self, s: &str) -> &mut Self {
        self.push_str(s);
        self
    }

    fn num<N: itoa::Integer>(&mut self, n: N) -> &mut Self {
        self.push_str(itoa::Buffer::new().format(n));
        self
    }

    fn field<N: itoa::Integer>(&mut self, key: &str, n: N) -> &mut Self {
        self.push_str(", \"");
        self.push_str(key);
        self.push_str("\":");
        self.num(n)
    }

    fn addr(&mut self, addr: IpAddr) -> &mut Self {
        match addr {
            IpAddr::V4(v4) => {
                let [a, b, c, d] = v4.octets();
                self.num(a).raw(".").num(b).raw(".").num(c).raw(".").num(d)
            }
            IpAddr::V6(v6) => {
                let _ = write!(self, "{v6}");
                self
            }
        }
    }

    fn millis(&mut self, micros: u64) -> &mut Self {
        let frac = micros % 1000;
        self.num(micros / 1000).raw(".");
        // Zero-padded to three digits.
        if frac < 100 {
            self.push('0');
        }
        if frac < 10 {
            self.push('0');
        }
        self.num(frac)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn numbers_addresses_and_milliseconds_print_as_display_does() {
        for n in [0u64, 7, 10, 99, 100, 65_535, u64::MAX] {
            assert_eq!(String::new().num(n).as_str(), n.to_string());
        }
        for v4 in [
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::new(10, 77, 100, 5),
            Ipv4Addr::new(255, 0, 9, 199),
        ] {
            assert_eq!(String::new().addr(v4.into()).as_str(), v4.to_string());
        }
        for v6 in [
            Ipv6Addr::LOCALHOST,
            "fd77:100::5".parse().expect("v6"),
            "2001:db8:0:1:1:1:1:1".parse().expect("v6"),
        ] {
            assert_eq!(String::new().addr(v6.into()).as_str(), v6.to_string());
        }
        for micros in [0u64, 1, 41, 999, 1000, 1001, 12_345, 1_000_010] {
            let display = format!("{}.{:03}", micros / 1000, micros % 1000);
            assert_eq!(String::new().millis(micros).as_str(), display);
        }
        assert_eq!(
            String::from("{").raw("\"a\":1").field("b", 2u8).as_str(),
            r#"{"a":1, "b":2"#
        );
    }
}
