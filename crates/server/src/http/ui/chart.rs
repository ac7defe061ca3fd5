//! The overview's chart, drawn on the server as SVG (no script, no inline style): tokens
//! released per day over the last fortnight, one stacked bar per day, one colour per agent
//! (the five busiest; the rest together).

use std::collections::BTreeMap;

use latchkey_core::store::DailyCount;

use super::super::web::esc;

pub const DAYS: i64 = 14;
const TOP: usize = 5;
const COLOURS: [&str; 6] = [
    "#0b5cad", "#c2410c", "#15803d", "#7e22ce", "#be123c", "#4d5761",
];

/// The chart and its legend.
pub struct Chart {
    pub svg: String,
    /// (CSS swatch class, label, total) per series.
    pub legend: Vec<(String, String, i64)>,
    pub total: i64,
}

/// `counts` (any order) for the `DAYS` days ending with `today` (a day's 00:00 UTC); `name`
/// gives an agent's display name.
pub fn draw(counts: &[DailyCount], today: i64, name: impl Fn(&str) -> String) -> Chart {
    let first = today - (DAYS - 1) * 86_400;
    // Busiest agents first; ties by id so the colours are stable.
    let mut per_agent: BTreeMap<&str, i64> = BTreeMap::new();
    for c in counts.iter().filter(|c| c.day >= first && c.day <= today) {
        *per_agent.entry(&c.agent_id).or_default() += c.count;
    }
    let mut ranked: Vec<(&str, i64)> = per_agent.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let series_of = |agent: &str| {
        ranked
            .iter()
            .position(|(a, _)| *a == agent)
            .map_or(TOP, |i| i.min(TOP))
    };
    let mut grid = vec![[0i64; TOP + 1]; DAYS as usize];
    for c in counts.iter().filter(|c| c.day >= first && c.day <= today) {
        grid[((c.day - first) / 86_400) as usize][series_of(&c.agent_id)] += c.count;
    }
    let mut legend: Vec<(String, String, i64)> = ranked
        .iter()
        .take(TOP)
        .enumerate()
        .map(|(i, (agent, n))| (format!("s{i}"), name(agent), *n))
        .collect();
    let others: i64 = ranked.iter().skip(TOP).map(|(_, n)| n).sum();
    if others > 0 {
        legend.push((format!("s{TOP}"), "other agents".into(), others));
    }
    let total = ranked.iter().map(|(_, n)| n).sum();

    let (width, height, left, bottom, top) = (700.0, 220.0, 44.0, 28.0, 10.0);
    let peak = grid
        .iter()
        .map(|d| d.iter().sum::<i64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let plot_h = height - bottom - top;
    let slot = (width - left) / DAYS as f64;
    let bar = slot * 0.7;
    let mut svg = format!(
        "<svg id=\"release-chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {width} {height}\" role=\"img\" \
         aria-labelledby=\"release-chart-title\"><title id=\"release-chart-title\">Tokens released per day, last {DAYS} days: {total} in all</title>"
    );
    // Axis: zero and the peak.
    svg.push_str(&format!(
        "<line x1=\"{left}\" y1=\"{y0}\" x2=\"{width}\" y2=\"{y0}\" stroke=\"#8c959f\"/>\
         <text x=\"{lx}\" y=\"{y0}\" font-size=\"11\" text-anchor=\"end\" fill=\"#4d5761\">0</text>\
         <text x=\"{lx}\" y=\"{yp}\" font-size=\"11\" text-anchor=\"end\" fill=\"#4d5761\">{peak}</text>",
        y0 = height - bottom,
        lx = left - 6.0,
        yp = top + 10.0,
    ));
    for (d, day) in grid.iter().enumerate() {
        let x = left + d as f64 * slot + (slot - bar) / 2.0;
        let mut y = height - bottom;
        let date = super::when(first + d as i64 * 86_400);
        let label = date.get(5..10).unwrap_or("");
        for (series, &n) in day.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let h = plot_h * n as f64 / peak as f64;
            y -= h;
            let who = legend
                .iter()
                .find(|(class, _, _)| *class == format!("s{series}"))
                .map_or("", |(_, l, _)| l.as_str());
            svg.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{}: {n} on {}</title></rect>",
                COLOURS[series],
                esc(who),
                esc(date.get(..10).unwrap_or("")),
            ));
        }
        if d % 2 == 1 || DAYS <= 7 {
            svg.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\" fill=\"#4d5761\">{}</text>",
                x + bar / 2.0,
                height - 8.0,
                esc(label)
            ));
        }
    }
    svg.push_str("</svg>");
    Chart { svg, legend, total }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(day: i64, agent: &str, count: i64) -> DailyCount {
        DailyCount {
            day,
            agent_id: agent.into(),
            count,
        }
    }

    #[test]
    fn bars_stack_per_day_and_names_are_escaped() {
        let today = 20_000 * 86_400;
        let counts = [
            c(today, "a", 3),
            c(today, "b", 1),
            c(today - 86_400, "a", 2),
            // Outside the fortnight: not drawn, not counted.
            c(today - DAYS * 86_400, "a", 50),
        ];
        let chart = draw(&counts, today, |id| format!("<{id}>"));
        assert_eq!(chart.total, 6);
        assert_eq!(
            chart.legend,
            vec![
                ("s0".to_owned(), "<a>".to_owned(), 5),
                ("s1".to_owned(), "<b>".to_owned(), 1)
            ]
        );
        assert_eq!(chart.svg.matches("<rect").count(), 3);
        assert!(chart.svg.contains("&lt;a&gt;: 3 on"));
        assert!(!chart.svg.contains("<a>"));
        // The tallest day reaches the top of the plot.
        assert!(chart.svg.contains(">4</text>"));
    }

    #[test]
    fn more_than_five_agents_share_the_last_colour() {
        let today = 20_000 * 86_400;
        let counts: Vec<_> = (0..8).map(|i| c(today, &format!("g{i}"), 10 - i)).collect();
        let chart = draw(&counts, today, str::to_owned);
        assert_eq!(chart.legend.len(), 6);
        assert_eq!(chart.legend[5].1, "other agents");
        assert_eq!(chart.legend[5].2, 3 + 4 + 5);
        assert_eq!(chart.total, (3..=10).sum::<i64>());
    }
}
