//! The value syntaxes Harness YAML uses inside strings: durations (`1h 30m`) and
//! Kubernetes resource quantities (`500Mi`, `400m`). Each parser returns a message
//! fit to follow "invalid `timeout`: ..." when the text is wrong.

use std::time::Duration;

/// `10s`, `5m`, `1h 30m`, `1h30m`, `1d`, `1w`, `500ms`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "`{s}` is not a duration (write e.g. `10s`, `5m`, `1h 30m`, `1d`)"
            ));
        }
        let n: u128 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{s}`: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let millis: u128 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 7 * 86_400_000,
            "" => return Err(format!("`{s}`: a number needs a unit (ms, s, m, h, d, w)")),
            u => return Err(format!("`{s}`: unknown unit `{u}` (use ms, s, m, h, d, w)")),
        };
        total = total
            .checked_add(n.checked_mul(millis).ok_or("duration too large")?)
            .ok_or("duration too large")?;
        rest = rest[unit_len..].trim_start();
    }
    let millis = u64::try_from(total).map_err(|_| "duration too large".to_string())?;
    Ok(Duration::from_millis(millis))
}

/// Split a quantity into its decimal number and suffix, checking the number.
fn split_quantity(text: &str) -> Result<(f64, &str), String> {
    let s = text.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(end);
    if num.is_empty() || num.starts_with('.') && num.len() == 1 {
        return Err(format!("`{s}` is not a quantity"));
    }
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a quantity"))?;
    Ok((n, suffix))
}

/// Memory in bytes: `500Mi`, `1Gi`, `1G`, `512k`, `1048576`.
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let (n, suffix) = split_quantity(text)?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        other => {
            return Err(format!(
                "`{}`: unknown memory unit `{other}` (use Ki, Mi, Gi, Ti, k, M, G, T)",
                text.trim()
            ))
        }
    };
    let bytes = (n * mult).ceil();
    if bytes <= 0.0 || !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(format!("`{}` is not a usable memory size", text.trim()));
    }
    Ok(bytes as u64)
}

/// CPU in millicores: `400m` = 400, `0.5` = 500, `2` = 2000.
pub fn parse_cpu(text: &str) -> Result<u64, String> {
    let (n, suffix) = split_quantity(text)?;
    let millis = match suffix {
        "" => n * 1000.0,
        "m" => n,
        other => {
            return Err(format!(
                "`{}`: unknown cpu unit `{other}` (write cores, e.g. `0.5`, or millicores, e.g. `400m`)",
                text.trim()
            ))
        }
    };
    let millis = millis.ceil();
    if millis <= 0.0 || !millis.is_finite() || millis > u64::MAX as f64 {
        return Err(format!("`{}` is not a usable cpu amount", text.trim()));
    }
    Ok(millis as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let d = |s| parse_duration(s).unwrap().as_secs();
        assert_eq!(d("10s"), 10);
        assert_eq!(d("5m"), 300);
        assert_eq!(d("1h 30m"), 5400);
        assert_eq!(d("1h30m"), 5400);
        assert_eq!(d("1d"), 86400);
        assert_eq!(d("1w"), 7 * 86400);
        assert_eq!(parse_duration("500ms").unwrap().as_millis(), 500);
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn memory() {
        assert_eq!(parse_memory("500Mi").unwrap(), 500 * 1024 * 1024);
        assert_eq!(parse_memory("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_memory("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_memory("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_memory("1024").unwrap(), 1024);
        assert!(parse_memory("1GB").is_err());
        assert!(parse_memory("0").is_err());
        assert!(parse_memory("Mi").is_err());
    }

    #[test]
    fn cpu() {
        assert_eq!(parse_cpu("400m").unwrap(), 400);
        assert_eq!(parse_cpu("0.5").unwrap(), 500);
        assert_eq!(parse_cpu("2").unwrap(), 2000);
        assert_eq!(parse_cpu("1.25").unwrap(), 1250);
        assert!(parse_cpu("1Gi").is_err());
        assert!(parse_cpu("-1").is_err());
    }
}
