// The console's one script (served from /console/app.js; no inline script is allowed): the
// recent decisions are read again every few seconds, with the page's filters, and written as
// text (never as HTML).
(function () {
  'use strict';
  var rows = document.getElementById('decision-rows');
  if (!rows) { return; }
  function cell(tr, text) {
    var td = document.createElement('td');
    td.textContent = text == null ? '' : String(text);
    tr.appendChild(td);
    return td;
  }
  function render(decisions) {
    var body = document.createElement('tbody');
    body.id = 'decision-rows';
    decisions.forEach(function (d) {
      var tr = document.createElement('tr');
      tr.className = d.decision === 'allow' ? 'allow' : 'deny';
      var time = cell(tr, '');
      var link = document.createElement('a');
      link.href = '/console/decisions/' + encodeURIComponent(d.decision_id || '');
      link.textContent = d.time || '';
      time.appendChild(link);
      cell(tr, d.agent);
      cell(tr, d.user);
      cell(tr, d.action);
      cell(tr, d.decision);
      cell(tr, (d.policies || []).join(', '));
      cell(tr, d.status);
      body.appendChild(tr);
    });
    rows.replaceWith(body);
    rows = body;
  }
  function refresh() {
    fetch('/console/decisions.json' + window.location.search, { credentials: 'same-origin' })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) { if (data) { render(data.decisions); } })
      .catch(function () {});
  }
  window.setInterval(refresh, 3000);
}());
