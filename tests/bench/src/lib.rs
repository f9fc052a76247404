//! `cargo xtask bench`: weft and its peers (kube-proxy's iptables and nftables modes, the
//! kernel's VXLAN device as flannel sets it up) measured side by side in one run. This module
//! holds what is pure: samples and their summary, the report table and its plot; [`peers`]
//! writes each contender's configuration, [`load`] generates traffic.

pub mod load;
pub mod machine;
pub mod overlay;
pub mod peers;

use std::fmt::Write as _;

/// A contender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Contender {
    Weft,
    /// weft with pods' service connections translated per packet (`--socket-lb=host-only`),
    /// beside weft's default, where a pod's socket is pointed at the endpoint at `connect()`.
    WeftPacketNat,
    Iptables,
    Nftables,
    KernelVxlan,
    /// The kernel's VXLAN device as flannel sets it up, on a node that also runs kube-proxy's
    /// iptables rules with `br_netfilter` on: what a flannel + kube-proxy node runs.
    KernelVxlanKubeProxy,
    /// weft with one part of its overlay path left out, to show what that part contributes.
    WeftKernelRouting,
    WeftNoVxlanDevice,
    WeftNativeXdp,
    /// Two pods on one node's bridge: no encapsulation at all, the limit.
    SameNode,
}

impl Contender {
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Weft => "weft",
            Self::WeftPacketNat => "weft, --socket-lb=host-only (pods per packet)",
            Self::Iptables => "kube-proxy iptables",
            Self::Nftables => "kube-proxy nftables",
            Self::KernelVxlan => "flannel vxlan (kernel)",
            Self::KernelVxlanKubeProxy => "flannel vxlan + kube-proxy iptables, br_netfilter",
            Self::WeftKernelRouting => "weft, --host-routing=kernel",
            Self::WeftNoVxlanDevice => "weft, --vxlan-device=off",
            Self::WeftNativeXdp => "weft, --xdp=native",
            Self::SameNode => "same node, no encapsulation",
        }
    }
}

/// Repeated measurements of one figure.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    fn sorted(&self) -> Vec<f64> {
        let mut values = self.0.clone();
        values.sort_by(f64::total_cmp);
        values
    }

    /// The middle value (the mean of the two middle ones for an even count).
    #[must_use]
    pub fn median(&self) -> Option<f64> {
        let values = self.sorted();
        let n = values.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => Some(values[n / 2]),
            _ => Some(f64::midpoint(values[n / 2 - 1], values[n / 2])),
        }
    }

    /// Smallest and largest.
    #[must_use]
    pub fn spread(&self) -> Option<(f64, f64)> {
        let values = self.sorted();
        Some((*values.first()?, *values.last()?))
    }
}

/// The `q` quantile (0..=1) of `values`, nearest rank.
#[must_use]
pub fn quantile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank within a slice's length"
    )]
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}

/// Which way is better for a figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One line of the report: a figure in one case, for each contender measured.
#[derive(Clone, Debug)]
pub struct Row {
    pub figure: String,
    pub case: String,
    pub unit: &'static str,
    pub better: Better,
    pub results: Vec<(Contender, Samples)>,
    /// What went wrong in a contender's runs (errors, timeouts, drops), printed beside its figure.
    pub notes: Vec<(Contender, String)>,
}

impl Row {
    #[must_use]
    pub fn new(figure: &str, case: &str, unit: &'static str, better: Better) -> Self {
        Self {
            figure: figure.to_owned(),
            case: case.to_owned(),
            unit,
            better,
            results: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Marks `contender`'s figure with `note` (once per run it applies to).
    pub fn note(&mut self, contender: Contender, note: String) {
        self.notes.push((contender, note));
    }

    /// `contender`'s notes, each once, with how many runs it applies to.
    fn notes_of(&self, contender: Contender) -> String {
        let mut counted: Vec<(&str, usize)> = Vec::new();
        for (_, note) in self.notes.iter().filter(|(c, _)| *c == contender) {
            match counted.iter_mut().find(|(n, _)| *n == note) {
                Some((_, count)) => *count += 1,
                None => counted.push((note, 1)),
            }
        }
        counted
            .iter()
            .map(|(note, count)| {
                if *count == 1 {
                    format!(" ⚠ {note}")
                } else {
                    format!(" ⚠ {note} (×{count})")
                }
            })
            .collect()
    }

    /// Adds one sample for `contender`.
    pub fn add(&mut self, contender: Contender, value: f64) {
        match self.results.iter_mut().find(|(c, _)| *c == contender) {
            Some((_, samples)) => samples.0.push(value),
            None => self.results.push((contender, Samples(vec![value]))),
        }
    }

    fn median_of(&self, contender: Contender) -> Option<f64> {
        self.results
            .iter()
            .find(|(c, _)| *c == contender)
            .and_then(|(_, s)| s.median())
    }

    /// weft's median over each peer's, and whether weft is the better of the two.
    #[must_use]
    pub fn ratios(&self) -> Vec<(Contender, f64, bool)> {
        let Some(weft) = self.median_of(Contender::Weft) else {
            return Vec::new();
        };
        self.results
            .iter()
            .filter(|(c, _)| *c != Contender::Weft)
            .filter_map(|(c, s)| {
                let peer = s.median()?;
                (peer != 0.0).then(|| {
                    let ratio = weft / peer;
                    let weft_better = match self.better {
                        Better::Higher => ratio >= 1.0,
                        Better::Lower => ratio <= 1.0,
                    };
                    (*c, ratio, weft_better)
                })
            })
            .collect()
    }
}

fn format_value(value: f64) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// The report as a Markdown table: per row, each contender's median with its spread
/// (min–max over the repetitions), and weft's ratio to each peer, marked where weft loses.
#[must_use]
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| figure | case | unit (better) | contender: median (min–max) | weft / peer |\n\
         |---|---|---|---|---|\n",
    );
    for row in rows {
        let results: Vec<String> = row
            .results
            .iter()
            .filter_map(|(contender, samples)| {
                let median = samples.median()?;
                let (low, high) = samples.spread()?;
                Some(format!(
                    "{}: **{}** ({}–{}){}",
                    contender.label(),
                    format_value(median),
                    format_value(low),
                    format_value(high),
                    row.notes_of(*contender)
                ))
            })
            .collect();
        let ratios: Vec<String> = row
            .ratios()
            .into_iter()
            .map(|(peer, ratio, weft_better)| {
                format!(
                    "{:.2}× vs {}{}",
                    ratio,
                    peer.label(),
                    if weft_better { "" } else { " (weft loses)" }
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} ({}) | {} | {} |",
            row.figure,
            row.case,
            row.unit,
            match row.better {
                Better::Higher => "higher",
                Better::Lower => "lower",
            },
            results.join("<br>"),
            if ratios.is_empty() {
                "–".to_owned()
            } else {
                ratios.join("<br>")
            }
        );
    }
    out
}

/// A contender's points (x, y) on a plot.
pub type Series = (Contender, Vec<(f64, f64)>);

/// A line plot (SVG) of `series` (contender → points (x, y)) on a logarithmic x axis.
#[must_use]
pub fn plot(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    const WIDTH: f64 = 720.0;
    const HEIGHT: f64 = 420.0;
    const LEFT: f64 = 80.0;
    const RIGHT: f64 = 220.0;
    const TOP: f64 = 50.0;
    const BOTTOM: f64 = 60.0;
    const COLOURS: [&str; 4] = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"];
    let points: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    let x_max = points
        .iter()
        .map(|p| p.0)
        .fold(1.0, f64::max)
        .log10()
        .ceil()
        .max(1.0);
    let y_max = points.iter().map(|p| p.1).fold(0.0, f64::max) * 1.1;
    let y_max = if y_max > 0.0 { y_max } else { 1.0 };
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x_of = |x: f64| LEFT + x.max(1.0).log10() / x_max * plot_w;
    let y_of = |y: f64| TOP + plot_h - y / y_max * plot_h;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"25\" font-size=\"15\" text-anchor=\"middle\">{title}</text>\n\
         <line x1=\"{LEFT}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x_label}</text>\n\
         <text x=\"20\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 20 {})\">{y_label}</text>\n",
        LEFT + plot_w / 2.0,
        TOP + plot_h,
        LEFT + plot_w,
        TOP + plot_h,
        TOP + plot_h,
        LEFT + plot_w / 2.0,
        HEIGHT - 15.0,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
    );
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a small decade count"
    )]
    for decade in 0..=(x_max as u32) {
        let x = 10f64.powi(i32::try_from(decade).unwrap_or(0));
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            x_of(x),
            TOP + plot_h + 18.0,
            format_value(x)
        );
    }
    for tick in 0..=4 {
        let y = y_max * f64::from(tick) / 4.0;
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
             <line x1=\"{LEFT}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>",
            LEFT - 6.0,
            y_of(y) + 4.0,
            format_value(y),
            y_of(y),
            LEFT + plot_w,
            y_of(y)
        );
    }
    for (n, (contender, points)) in series.iter().enumerate() {
        let colour = COLOURS[n % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", x_of(*x), y_of(*y)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        for (x, y) in points {
            let _ = writeln!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>",
                x_of(*x),
                y_of(*y)
            );
        }
        #[expect(clippy::cast_precision_loss, reason = "a handful of series")]
        let legend_y = TOP + 20.0 * n as f64;
        let _ = writeln!(
            svg,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"14\" height=\"4\" fill=\"{colour}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            LEFT + plot_w + 15.0,
            legend_y,
            LEFT + plot_w + 35.0,
            legend_y + 5.0,
            contender.label()
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_spreads_and_quantiles() {
        assert_eq!(Samples(vec![3.0, 1.0, 2.0]).median(), Some(2.0));
        assert_eq!(Samples(vec![4.0, 1.0, 2.0, 3.0]).median(), Some(2.5));
        assert_eq!(Samples(vec![]).median(), None);
        assert_eq!(Samples(vec![3.0, 1.0, 2.0]).spread(), Some((1.0, 3.0)));
        let mut values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&mut values, 0.5), Some(50.0));
        assert_eq!(quantile(&mut values, 0.99), Some(99.0));
        assert_eq!(quantile(&mut [], 0.5), None);
    }

    #[test]
    fn ratios_say_where_weft_loses() {
        let mut rate = Row::new("connections", "1 service", "conn/s", Better::Higher);
        rate.add(Contender::Weft, 100.0);
        rate.add(Contender::Iptables, 50.0);
        rate.add(Contender::Nftables, 200.0);
        assert_eq!(
            rate.ratios(),
            [
                (Contender::Iptables, 2.0, true),
                (Contender::Nftables, 0.5, false)
            ]
        );
        let mut latency = Row::new("latency", "1 service", "µs", Better::Lower);
        latency.add(Contender::Weft, 10.0);
        latency.add(Contender::Iptables, 20.0);
        assert_eq!(latency.ratios(), [(Contender::Iptables, 0.5, true)]);
        rate.note(Contender::Nftables, "1 timeout".into());
        rate.note(Contender::Nftables, "1 timeout".into());
        rate.note(Contender::Nftables, "generator-bound".into());
        let text = table(&[rate, latency]);
        assert!(text.contains(
            "kube-proxy nftables: **200** (200–200) ⚠ 1 timeout (×2) ⚠ generator-bound |"
        ));
        assert!(text.contains("0.50× vs kube-proxy nftables (weft loses)"));
        assert!(text.contains("2.00× vs kube-proxy iptables<br>"));
        assert!(text.contains("weft: **100** (100–100)"));
    }

    #[test]
    fn the_plot_has_a_line_and_a_legend_per_contender() {
        let svg = plot(
            "t",
            "services",
            "µs",
            &[
                (Contender::Weft, vec![(1.0, 10.0), (1000.0, 11.0)]),
                (Contender::Iptables, vec![(1.0, 10.0), (1000.0, 90.0)]),
            ],
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(">kube-proxy iptables</text>"));
        assert!(svg.ends_with("</svg>\n"));
    }
}
