// Draws one uPlot chart per metric from the page's #chart-data (server-rendered JSON).
// The charts stay reachable as window.roundlogCharts, for people poking in devtools and for tests.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("chart-data").textContent);
  const palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
  const holder = document.getElementById("charts");
  window.roundlogCharts = data.charts.map(function (chart) {
    const box = document.createElement("figure");
    box.className = "chart";
    box.dataset.metric = chart.metric;
    holder.appendChild(box);
    const options = {
      title: chart.metric,
      width: 460,
      height: 240,
      scales: { x: { time: false } },
      legend: { live: false },
      axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100] }, { label: chart.metric }],
      series: [{ label: "round" }].concat(
        chart.series.map(function (s, k) {
          return {
            label: s.label,
            stroke: palette[k % palette.length],
            width: 2,
            points: { show: true, size: 6 },
            spanGaps: true,
          };
        })
      ),
    };
    return new uPlot(options, [data.x].concat(chart.series.map((s) => s.values)), box);
  });
})();
