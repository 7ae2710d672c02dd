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
    /// scamper's `ftime` of the Unix time `unix`, as [`crate::civil::ftime`] writes it.
    fn ftime(&mut self, unix: i64) -> &mut Self;
    /// `n` on at least two digits.
    fn two(&mut self, n: i64) -> &mut Self;
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

    fn two(&mut self, n: i64) -> &mut Self {
        if (0..10).contains(&n) {
            self.push('0');
        }
        self.num(n)
    }

    fn ftime(&mut self, unix: i64) -> &mut Self {
        let (year, month, day) = crate::civil::civil_from_days(unix.div_euclid(86_400));
        if !(1000..=9999).contains(&year) {
            self.push_str(&crate::civil::ftime(unix));
            return self;
        }
        let secs = unix.rem_euclid(86_400);
        self.num(year)
            .raw("-")
            .two(i64::from(month))
            .raw("-")
            .two(i64::from(day))
            .raw(" ")
            .two(secs / 3600)
            .raw(":")
            .two(secs / 60 % 60)
            .raw(":")
            .two(secs % 60)
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
        for unix in (-3_000_000_000i64..5_000_000_000).step_by(9_999_991) {
            assert_eq!(
                String::new().ftime(unix).as_str(),
                crate::civil::ftime(unix)
            );
        }
        assert_eq!(
            String::from("{").raw("\"a\":1").field("b", 2u8).as_str(),
            r#"{"a":1, "b":2"#
        );
    }
}
