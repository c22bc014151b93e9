// foreman's dashboard: one script for every page. It reads the page's JSON twin under /api/,
// renders it with DOM calls only (every value from the database becomes a text node, never
// HTML), follows /api/events for live changes, and acts through POSTs the server checks.
'use strict';

(() => {
  const main = document.getElementById('main');
  const dialog = document.getElementById('dialog');
  const params = new URLSearchParams(location.search);
  const path = location.pathname;
  const page = path === '/' ? 'overview'
    : /^\/tasks\/\d+$/.test(path) ? 'task'
    : path.slice(1);
  // Set once per load: a test tells a live update from a reload by it.
  window.foremanLoadedAt = Date.now();

  let skew = 0; // server time minus this browser's, in seconds
  let readOnly = false;
  let pending = false; // a change arrived while updates were frozen
  const selected = new Set();

  // ---- small helpers ----

  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
      else if (key === 'class') el.className = value;
      else el.setAttribute(key, value === true ? '' : String(value));
    }
    for (const kid of kids.flat(Infinity)) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(kid instanceof Node ? kid : String(kid));
    }
    return el;
  }

  const now = () => Date.now() / 1000 + skew;
  const number = (n) => (n === null || n === undefined ? '–' : Number(n).toLocaleString('en-US'));

  function age(seconds) {
    const s = Math.max(0, seconds);
    if (s < 10) return s.toFixed(1) + 's';
    const w = Math.floor(s);
    if (w < 60) return w + 's';
    if (w < 3600) return Math.floor(w / 60) + 'm ' + String(w % 60).padStart(2, '0') + 's';
    if (w < 86400) return Math.floor(w / 3600) + 'h ' + String(Math.floor((w % 3600) / 60)).padStart(2, '0') + 'm';
    return Math.floor(w / 86400) + 'd ' + String(Math.floor((w % 86400) / 3600)).padStart(2, '0') + 'h';
  }

  function span(s) {
    if (s === null || s === undefined) return '–';
    if (s < 0.001) return Math.round(s * 1e6) + 'µs';
    if (s < 1) return Math.round(s * 1e3) + 'ms';
    if (s < 10) return s.toFixed(2) + 's';
    return age(s);
  }

  const stamp = (t) => new Date(t * 1000).toLocaleString();

  // "12s ago", kept current by the ticker below without asking the server.
  function ago(t) {
    if (t === null || t === undefined) return h('span', { class: 'muted' }, '–');
    return h('span', { 'data-ago': t, title: stamp(t) }, age(now() - t) + ' ago');
  }

  function until(t) {
    if (t === null || t === undefined) return h('span', { class: 'muted' }, '–');
    return h('span', { 'data-until': t, title: stamp(t) }, untilText(t));
  }

  const untilText = (t) => (t <= now() ? age(now() - t) + ' ago' : 'in ' + age(t - now()));

  setInterval(() => {
    for (const el of document.querySelectorAll('[data-ago]')) el.textContent = age(now() - Number(el.dataset.ago)) + ' ago';
    for (const el of document.querySelectorAll('[data-until]')) el.textContent = untilText(Number(el.dataset.until));
  }, 1000);

  const state = (s) => h('span', { class: 'state ' + (s || '') }, s || '?');
  const taskLink = (id) => h('a', { href: '/tasks/' + id }, '#' + id);
  const namesLink = (name, extra) => h('a', { href: '/tasks?' + new URLSearchParams({ name, ...(extra || {}) }) }, name);

  async function getJson(url) {
    const response = await fetch(url, { headers: { Accept: 'application/json' } });
    const doc = await response.json();
    if (!response.ok) throw new Error(doc.error || response.statusText);
    if (typeof doc.now === 'number') skew = doc.now - Date.now() / 1000;
    if (doc.ui) {
      readOnly = doc.ui.read_only;
      document.getElementById('foot').textContent =
        (readOnly ? 'read-only · ' : '') + 'signed in as ' + doc.ui.who;
    }
    return doc;
  }

  // Renders `doc` unless it says what the page already shows (times aside): a live update that
  // changes nothing leaves the page, and whatever the user is about to click, alone.
  let shown = null;
  function changed(doc) {
    const { now: _now, ui: _ui, ...rest } = doc;
    const text = JSON.stringify(rest);
    if (text === shown) return false;
    shown = text;
    return true;
  }

  async function post(url, body) {
    const response = await fetch(url, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
      body: JSON.stringify(body),
    });
    const doc = await response.json();
    if (!response.ok) throw new Error(doc.error || response.statusText);
    return doc;
  }

  function table(headers, rows, empty) {
    if (!rows.length) return h('div', { class: 'empty' }, empty || 'Nothing here.');
    return h('table', {},
      h('thead', {}, h('tr', {}, headers.map((c) => h('th', { class: /^(#|[A-Z ]+#)$|^(COUNT|DUE|LATER|LEASED|QUEUED|ATTEMPT|ATTEMPTS|DEAD|UP|BUSY|PROCESSES|PRIORITY)$/.test(c) ? 'num' : '' }, c)))),
      h('tbody', {}, rows));
  }

  // Replaces an element's children; null, undefined and false stand for nothing.
  function fill(el, ...nodes) {
    el.replaceChildren(...nodes.flat(Infinity).filter((n) => n !== null && n !== undefined && n !== false));
  }

  function setPage(...nodes) {
    fill(main, ...nodes);
  }

  function failed(error) {
    setPage(h('div', { class: 'notice bad' }, String(error.message || error)));
  }

  // ---- the header: health and dead letters, on every page ----

  function header(doc) {
    const pill = document.getElementById('health-pill');
    const reason = doc.health.reason;
    pill.className = 'pill ' + (reason === 'ok' ? 'ok' : doc.health.healthy ? 'warn' : 'bad');
    pill.textContent = doc.health.healthy ? (reason === 'ok' ? 'healthy' : reason) : 'unhealthy: ' + reason;
    pill.title = doc.health.line;
    document.getElementById('nav-dead').textContent = doc.dead ? number(doc.dead) : '';
  }

  for (const link of document.querySelectorAll('nav a')) {
    if (link.dataset.page === page || (page === 'task' && link.dataset.page === 'tasks')) link.classList.add('on');
  }

  // ---- dialogs (live updates are frozen while one is open) ----

  function openDialog(...nodes) {
    fill(dialog, ...nodes);
    if (!dialog.open) dialog.showModal();
  }

  dialog.addEventListener('close', () => thaw());

  function closeDialog() {
    dialog.close();
  }

  function frozen() {
    return dialog.open || selected.size > 0;
  }

  function thaw() {
    if (!frozen() && pending) {
      pending = false;
      refresh();
    }
  }

  // A confirmation for an action on a frozen set: the exact count first, then the action.
  function confirmAction({ title, lines, button, danger, typed, cli, run }) {
    const go = h('button', { class: danger ? 'danger' : 'primary', type: 'submit' }, button);
    const result = h('div', { class: 'result' });
    let input = null;
    if (typed) {
      input = h('input', { type: 'text', autocomplete: 'off', placeholder: typed, 'aria-label': 'confirmation' });
      go.disabled = true;
      input.addEventListener('input', () => { go.disabled = input.value.trim() !== typed; });
    }
    const form = h('form', { method: 'dialog' },
      h('h3', {}, title),
      lines.map((line) => h('p', {}, line)),
      typed ? h('p', {}, 'Type ', h('code', { class: 'cli' }, typed), ' to confirm: ', input) : null,
      cli ? h('p', { class: 'muted small' }, 'Same as: ', h('code', { class: 'cli' }, cli)) : null,
      result,
      h('div', { class: 'actions' },
        h('button', { type: 'button', onclick: closeDialog }, 'Close'),
        go));
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      go.disabled = true;
      try {
        const doc = await run(input ? input.value.trim() : null);
        const shown = doc.lines.slice(0, 12);
        fill(result, 
          h('p', {}, `Done: ${number(doc.done)} of ${number(doc.asked)}.`),
          h('ul', {}, shown.map((line) => h('li', {}, line)),
            doc.lines.length > shown.length ? h('li', {}, `… ${doc.lines.length - shown.length} more`) : null));
        go.remove();
        selected.clear();
        pending = true;
      } catch (error) {
        fill(result, h('div', { class: 'notice bad' }, String(error.message)));
        go.disabled = false;
      }
    });
    openDialog(form);
    (input || go).focus();
  }

  function idsText(ids) {
    return ids.length <= 8 ? ids.join(' ') : ids.slice(0, 8).join(' ') + ' …';
  }

  // ---- overview ----

  let chartsAt = 0;
  let overviewDoc = null;

  async function loadOverview() {
    const doc = await getJson('/api/overview');
    renderOverview(doc);
  }

  function card(id, label, value, sub) {
    return h('div', { class: 'card', id }, h('div', { class: 'label' }, label), h('div', { class: 'value' }, value), h('div', { class: 'sub' }, sub));
  }

  function renderOverview(doc) {
    overviewDoc = doc;
    header(doc);
    const d = doc.daemon;
    const q = doc.queue;
    const reason = doc.health.reason;
    const pools = doc.pools || [];
    const up = pools.reduce((n, p) => n + (p.up || 0), 0);
    const processes = pools.reduce((n, p) => n + (p.processes || 0), 0);
    const verdict = h('div', { class: 'verdict ' + (reason === 'ok' ? 'ok' : doc.health.healthy ? 'warn' : 'bad'), id: 'verdict' },
      h('b', {}, doc.health.healthy ? 'healthy' : 'unhealthy'), doc.health.healthy && reason === 'ok' ? doc.health.message : doc.health.line);
    const cards = h('div', { class: 'cards' },
      doc.shared
        ? card('card-daemon', 'Daemons up', `${(doc.daemons || []).filter((x) => x.state === 'up').length}`,
          `of ${(doc.daemons || []).length} on the database · ${new Set((doc.daemons || []).filter((x) => x.state === 'up').map((x) => x.host)).size} host(s)`)
        : card('card-daemon', 'Daemon', d.running ? 'up' : 'down',
          d.running ? [`pid ${d.pid ?? '?'}`, d.uptime_seconds != null ? ` · up ${age(d.uptime_seconds)}` : ''] : (d.pid ? `last pid ${d.pid}` : 'never ran here')),
      card('card-heartbeat', 'Heartbeat', d.heartbeat_at ? ago(d.heartbeat_at) : '–', d.version ? `foreman ${d.version}` : ''),
      card('card-workers', 'Workers busy', doc.workers.total != null ? `${doc.workers.busy} / ${doc.workers.total}` : '–', d.running ? '' : 'daemon down'),
      card('card-pools', 'Pools up', pools.length ? `${up} / ${processes}` : '–', pools.length ? pools.map((p) => p.name).join(', ') : 'no pools'),
      card('card-queue', 'Queued', h('span', { id: 'queue-total' }, number(q.total)), `${number(q.due)} due · ${number(q.delayed)} later · ${number(q.leased)} leased`),
      card('card-oldest', 'Oldest due', q.oldest_due_age_seconds != null ? age(q.oldest_due_age_seconds) : '–', q.oldest_due_task_id ? ['task ', taskLink(q.oldest_due_task_id)] : 'nothing due'),
      card('card-dead', 'Dead letters', h('a', { href: '/dead' }, number(doc.dead)), ''),
      card('card-minute', 'Last minute', `${number(doc.last_minute.done)} done`, `${number(doc.last_minute.failed)} failed`));
    const names = Object.entries(q.by_task).sort((a, b) => b[1].due - a[1].due || b[1].queued - a[1].queued || a[0].localeCompare(b[0]));
    const queue = table(['NAME', 'QUEUED', 'DUE', 'LATER', 'LEASED', 'OLDEST DUE', 'NEXT LATER'],
      names.map(([name, t]) => h('tr', {},
        h('td', { class: 'name' }, namesLink(name)),
        h('td', { class: 'num' }, number(t.queued)), h('td', { class: 'num' }, number(t.due)),
        h('td', { class: 'num' }, number(t.delayed)), h('td', { class: 'num' }, number(t.leased)),
        h('td', {}, t.oldest_due_age_seconds != null ? age(t.oldest_due_age_seconds) : ''),
        h('td', {}, t.next_due_in_seconds != null ? 'in ' + age(t.next_due_in_seconds) : ''))),
      'The queue is empty.');
    const running = (doc.running || []).slice(0, 10);
    const enqueue = readOnly ? null : h('button', { class: 'primary', id: 'enqueue', onclick: enqueueDialog }, 'Enqueue a task…');
    const charts = document.getElementById('charts') || chartsPanel();
    // The charts first: an operator looks at a chart before reading a table.
    setPage(verdict, cards, charts,
      h('div', { class: 'bar' }, h('h2', { class: 'grow' }, 'Queue by task name'), enqueue),
      queue,
      running.length ? [h('h2', {}, `Running (${doc.running.length})`),
        table(['TASK', 'NAME', 'ATTEMPT', 'RUNNING FOR'], running.map((r) => h('tr', {},
          h('td', {}, taskLink(r.task_id)), h('td', { class: 'name' }, r.task_name), h('td', { class: 'num' }, r.attempt),
          h('td', {}, r.started_at ? ago(r.started_at) : '–'))))] : null);
    if (Date.now() - chartsAt > 30000) loadCharts();
  }

  function chartsPanel() {
    const win = params.get('window') || '1h';
    const seg = h('span', { class: 'seg' }, ['1h', '24h', '7d'].map((w) =>
      h('a', { href: '/?window=' + w, class: w === win ? 'on' : '' }, w)));
    return h('div', { id: 'charts', class: 'panel' },
      h('div', { class: 'bar' }, h('h2', { class: 'grow' }, 'Throughput and latency'), seg),
      h('div', { class: 'charts' },
        h('div', {}, h('div', { class: 'chart-title' }, 'Attempts ended per interval'), h('div', { id: 'chart-count' })),
        h('div', {}, h('div', { class: 'chart-title' }, 'Wait and wall time (p50, p95)'), h('div', { id: 'chart-time' }))),
      h('p', { class: 'legend-note', id: 'chart-note' }));
  }

  let plots = [];

  async function loadCharts() {
    chartsAt = Date.now();
    const win = params.get('window') || '1h';
    let doc;
    try {
      doc = await getJson('/api/stats?window=' + encodeURIComponent(win));
    } catch (error) {
      const note = document.getElementById('chart-note');
      if (note) note.textContent = String(error.message);
      return;
    }
    const c = doc.chart;
    const xs = c.starts;
    const count = document.getElementById('chart-count');
    const time = document.getElementById('chart-time');
    if (!count || !time || typeof uPlot === 'undefined') return;
    for (const plot of plots) plot.destroy();
    const width = Math.max(320, count.clientWidth || 560);
    const nulls = (values) => values.map((v) => (v === null || v === undefined ? null : v));
    // A series with few values draws its points, or one lone interval would not show at all.
    const sparse = (values) => ({ show: values.filter((v) => v !== null).length < 12, size: 6 });
    const axes = (label) => [{ stroke: '#6b7385' }, { stroke: '#6b7385', label, size: 60 }];
    plots = [
      new uPlot({
        width, height: 220, axes: axes('attempts'),
        scales: { x: { time: true } },
        series: [{}, { label: 'done', stroke: '#1b7f4b', fill: 'rgba(27,127,75,.12)', width: 2 },
          { label: 'failed', stroke: '#c53030', fill: 'rgba(197,48,48,.12)', width: 2 }],
      }, [xs, c.done, c.failed], count),
      new uPlot({
        width, height: 220, axes: axes('seconds'),
        scales: { x: { time: true }, y: { distr: 3 } },
        series: [{},
          { label: 'wait p50', stroke: '#2b5fd9', width: 2, points: sparse(c.wait_p50_seconds) },
          { label: 'wait p95', stroke: '#2b5fd9', dash: [6, 4], width: 1.5, points: sparse(c.wait_p95_seconds) },
          { label: 'wall p50', stroke: '#b7791f', width: 2, points: sparse(c.wall_p50_seconds) },
          { label: 'wall p95', stroke: '#b7791f', dash: [6, 4], width: 1.5, points: sparse(c.wall_p95_seconds) }],
      }, [xs, nulls(c.wait_p50_seconds), nulls(c.wait_p95_seconds), nulls(c.wall_p50_seconds), nulls(c.wall_p95_seconds)], time),
    ];
    const step = doc.interval_seconds;
    const stepText = step < 3600 ? `${step / 60} min` : step < 86400 ? `${step / 3600} h` : `${step / 86400} d`;
    document.getElementById('chart-note').textContent =
      `Last ${win} in intervals of ${stepText}, from the daemon's per-minute figures (foreman stats --window ${win}): ` +
      `${number(doc.total.count)} attempts ended, ${number(doc.total.failed)} failed. Percentiles are within 9 %.`;
  }

  function enqueueDialog() {
    const field = (label, input) => h('label', {}, label, input);
    const name = h('input', { name: 'name', required: true, placeholder: 'myapp.send_email' });
    const args = h('textarea', { name: 'args', rows: 2 }, '[]');
    const kwargs = h('textarea', { name: 'kwargs', rows: 2 }, '{}');
    const delay = h('input', { name: 'delay', placeholder: 'e.g. 10m (empty: now)' });
    const priority = h('input', { name: 'priority', type: 'number', min: -100, max: 100, value: 0 });
    const result = h('div', { class: 'result' });
    const go = h('button', { class: 'primary', type: 'submit' }, 'Enqueue');
    const form = h('form', { class: 'stack', method: 'dialog' },
      h('h3', {}, 'Enqueue a task'),
      field('Task name', name), field('Args (JSON array)', args), field('Kwargs (JSON object)', kwargs),
      field('Delay', delay), field('Priority (-100 to 100, higher first)', priority), result,
      h('div', { class: 'actions' }, h('button', { type: 'button', onclick: closeDialog }, 'Close'), go));
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      go.disabled = true;
      try {
        const doc = await post('/api/enqueue', {
          name: name.value, args: args.value, kwargs: kwargs.value, delay: delay.value, priority: Number(priority.value || 0),
        });
        const cli = ['foreman enqueue', name.value, `'${args.value.trim() || '[]'}'`, `--kwargs '${kwargs.value.trim() || '{}'}'`,
          delay.value ? `--delay ${delay.value}` : '', Number(priority.value) ? `--priority ${priority.value}` : ''].filter(Boolean).join(' ');
        fill(result, h('p', {}, doc.lines[0], ' — ', taskLink(doc.task_id)),
          h('p', { class: 'muted small' }, 'Same as: ', h('code', { class: 'cli' }, cli)));
        pending = true;
      } catch (error) {
        fill(result, h('div', { class: 'notice bad' }, String(error.message)));
      }
      go.disabled = false;
    });
    openDialog(form);
    name.focus();
  }

  // ---- tasks ----

  function filterForm(action, fields) {
    return h('form', { class: 'filters', method: 'get', action },
      fields.map(([label, input]) => h('label', {}, label, input)),
      h('button', { type: 'submit', class: 'primary' }, 'Filter'),
      h('a', { href: action }, 'Clear'));
  }

  function countLine(count, what, searched) {
    if (!count) return null;
    const n = count.more ? (count.count >= 10000 ? '10,000+' : `at least ${number(count.count)}`) : number(count.count);
    return h('p', { class: 'muted', id: 'count' }, `${n} ${what}`,
      count.more && count.count < 10000 ? ` (counted among the newest ${number(100000)} rows)` : '', searched || '');
  }

  function pager(base, doc, idWord) {
    const links = [];
    const query = (before) => {
      const p = new URLSearchParams(params);
      if (before === null) p.delete('before'); else p.set('before', before);
      const text = p.toString();
      return base + (text ? '?' + text : '');
    };
    if (params.get('before')) links.push(h('a', { href: query(null) }, '« Newest'));
    if (doc.searched_to !== null && doc.searched_to !== undefined) {
      links.push(h('span', { class: 'muted' }, `No more matches among the rows looked at: searched down to ${idWord} ${number(doc.searched_to)}. `));
      links.push(h('a', { href: query(doc.searched_to), id: 'older' }, 'Search further »'));
    } else if (doc.next_before !== null && doc.next_before !== undefined) {
      links.push(h('a', { href: query(doc.next_before), id: 'older' }, 'Older »'));
    }
    return h('div', { class: 'bar' }, links);
  }

  function selectBox(id, onchange) {
    const box = h('input', { type: 'checkbox', 'data-id': id, 'aria-label': 'select ' + id });
    box.checked = selected.has(id);
    box.addEventListener('change', () => {
      if (box.checked) selected.add(id); else selected.delete(id);
      onchange();
    });
    return box;
  }

  async function loadTasks() {
    const query = new URLSearchParams(params);
    const doc = await getJson('/api/tasks?' + query);
    if (changed(doc)) renderTasks(doc);
  }

  function renderTasks(doc) {
    const f = doc.filter;
    const stateSelect = h('select', { name: 'state' },
      [['', 'live (queued, leased, running)'], ['all', 'every state'], ['history', 'history (ended)']]
        .concat(doc.states.map((s) => [s, s]))
        .map(([value, label]) => h('option', { value, selected: value === (f.state || '') }, label)));
    const form = filterForm('/tasks', [
      ['Task name', h('input', { name: 'name', value: f.name || '', placeholder: 'any' })],
      ['State', stateSelect],
      ['Text in args, kwargs or error', h('input', { name: 'q', value: f.q || '', placeholder: 'e.g. "a@example.com"', size: 28 })],
    ]);
    const cancellable = (t) => ['due', 'later', 'paused', 'running'].includes(t.state);
    const bulk = h('div', { class: 'bar' });
    const updateBulk = () => {
      fill(bulk,
        readOnly ? null : h('button', { id: 'cancel-selected', disabled: selected.size === 0, onclick: () => cancelTasks([...selected]) }, `Cancel selected (${selected.size})`),
        readOnly ? null : h('button', { id: 'cancel-matching', onclick: cancelMatching }, 'Cancel every queued task matching the filter…'),
        selected.size ? h('span', { class: 'muted small' }, 'Live updates are paused while rows are selected.') : null);
      if (!frozen()) thaw();
    };
    updateBulk();
    const rows = doc.tasks.map((t) => h('tr', {},
      h('td', {}, cancellable(t) && !readOnly ? selectBox(t.id, updateBulk) : null),
      h('td', { class: 'num' }, taskLink(t.id)),
      h('td', { class: 'name' }, t.task_name),
      h('td', {}, state(t.state)),
      h('td', { class: 'num' }, t.attempt),
      h('td', {}, t.finished_at ? ago(t.finished_at) : t.started_at ? ['started ', ago(t.started_at)] : t.run_after && t.state === 'later' ? until(t.run_after) : ago(t.enqueued_at)),
      h('td', { class: 'name small' }, t.origin || ''),
      h('td', { class: 'err' }, t.error_line || '')));
    setPage(h('h1', {}, 'Tasks'), form, countLine(doc.count, 'tasks match'), bulk,
      table(['', '#', 'NAME', 'STATE', 'ATTEMPT', 'WHEN', 'ORIGIN', 'ERROR'], rows, 'No task matches.'),
      pager('/tasks', doc, 'task'));
  }

  function cancelTasks(ids) {
    confirmAction({
      title: `Cancel ${number(ids.length)} queued task${ids.length === 1 ? '' : 's'}?`,
      lines: [`Exactly these: ${idsText(ids)}. A queued one is deleted before it starts; a running one is aborted (SIGTERM, then SIGKILL after 5s) by the daemon running it.`],
      button: `Cancel ${number(ids.length)}`,
      danger: true,
      cli: 'foreman cancel ' + idsText(ids),
      run: () => post('/api/tasks/cancel', { ids }),
    });
  }

  async function cancelMatching() {
    const query = new URLSearchParams(params);
    query.delete('before');
    try {
      const doc = await getJson('/api/tasks/ids?' + query);
      if (!doc.ids.length) {
        openDialog(h('form', { method: 'dialog' }, h('h3', {}, 'No queued task matches'), h('p', {}, 'Only tasks that have not started (due or later) can be cancelled.'),
          h('div', { class: 'actions' }, h('button', {}, 'Close'))));
        return;
      }
      const ids = doc.ids;
      confirmAction({
        title: `Cancel ${number(ids.length)} queued task${ids.length === 1 ? '' : 's'}?`,
        lines: [`These ${number(ids.length)} tasks matched the filter just now (ids ${number(ids[0])} to ${number(ids[ids.length - 1])}); exactly they are cancelled, not tasks enqueued after this count.`,
          doc.more ? 'More than 10,000 match: this takes the oldest 10,000; run it again for the rest.' : ''],
        button: `Cancel ${number(ids.length)}`,
        danger: true,
        cli: 'foreman cancel ' + idsText(ids),
        run: () => post('/api/tasks/cancel', { ids }),
      });
    } catch (error) {
      openDialog(h('div', { class: 'notice bad' }, String(error.message)));
    }
  }

  // ---- one task ----

  async function loadTask() {
    const id = Number(path.split('/')[2]);
    const doc = await getJson('/api/tasks/' + id);
    if (changed(doc)) renderTask(doc);
  }

  function renderTask(doc) {
    const q = doc.queued;
    const facts = h('dl', { class: 'facts' },
      h('dt', {}, 'Task name'), h('dd', { id: 'task-name' }, doc.task_name ?? '(none)'),
      h('dt', {}, 'State'), h('dd', {}, state(doc.state), doc.paused_since ? [' since ', ago(doc.paused_since)] : ''),
      h('dt', {}, 'Came from'), h('dd', { id: 'origin' }, doc.origin ?? 'a producer (no origin recorded)'),
      h('dt', {}, 'Enqueued'), h('dd', {}, ago(doc.enqueued_at)),
      h('dt', {}, 'Priority'), h('dd', {}, doc.priority ?? 0),
      doc.unique_key ? [h('dt', {}, 'Unique key'), h('dd', {}, doc.unique_key)] : null,
      q ? [h('dt', {}, 'Due'), h('dd', {}, until(q.run_after)), h('dt', {}, 'Next attempt'), h('dd', {}, q.attempt)] : null);
    const actions = h('div', { class: 'bar' },
      doc.cancellable && !readOnly ? h('button', { class: 'danger', id: 'cancel', onclick: () => cancelTasks([doc.task_id]) }, 'Cancel this task…') : null,
      doc.abortable && !readOnly ? h('button', { class: 'danger', id: 'abort', onclick: () => cancelTasks([doc.task_id]) }, 'Abort this task…') : null,
      h('span', { class: 'muted small' }, 'CLI: ', h('code', { class: 'cli' }, `foreman show ${doc.task_id}`)));
    const diff = (a, b) => (a != null && b != null ? Math.max(0, b - a) : null);
    const attempts = table(['ATTEMPT', 'STATE', 'DAEMON', 'ENQUEUED', 'STARTED', 'FINISHED', 'WAITED', 'RAN', 'EXIT', 'RETRY AT', 'ERROR'],
      doc.attempts.map((a) => h('tr', {},
        h('td', { class: 'num' }, a.attempt), h('td', {}, state(a.state), a.abort_requested_at ? h('div', { class: 'small muted' }, 'abort asked ', ago(a.abort_requested_at)) : null),
        h('td', { class: 'small' }, a.daemon ?? '–'),
        h('td', {}, a.enqueued_at ? ago(a.enqueued_at) : '–'), h('td', {}, a.started_at ? ago(a.started_at) : '–'),
        h('td', {}, a.finished_at ? ago(a.finished_at) : '–'),
        h('td', {}, span(diff(a.enqueued_at, a.started_at))), h('td', {}, span(diff(a.started_at, a.finished_at))),
        h('td', { class: 'num' }, a.exit_code ?? ''),
        h('td', {}, a.retry_at ? until(a.retry_at) : ''),
        h('td', { class: 'err' }, a.error ? h('pre', {}, a.error) : ''))),
      'No attempt recorded (the history keeps 7 days by default).');
    setPage(
      h('h1', {}, `Task #${doc.task_id} `, state(doc.state)),
      h('div', { class: 'panel' }, facts), actions,
      h('h2', {}, 'Args'), h('pre', { id: 'args' }, JSON.stringify(doc.args, null, 2) ?? 'null'),
      h('h2', {}, 'Kwargs'), h('pre', { id: 'kwargs' }, JSON.stringify(doc.kwargs, null, 2) ?? 'null'),
      doc.result !== null && doc.result !== undefined ? [h('h2', {}, 'Result'), h('pre', { id: 'result' }, JSON.stringify(doc.result, null, 2))] : null,
      h('h2', {}, 'Attempts'), attempts,
      doc.dead_letter ? [h('h2', {}, 'Dead letter'), deadTable([doc.dead_letter], () => {})] : null);
  }

  // ---- dead letters ----

  async function loadDead() {
    const doc = await getJson('/api/dead?' + new URLSearchParams(params));
    if (changed(doc)) renderDead(doc);
  }

  function deadTable(rows, onchange) {
    return table(['', 'DEAD', 'TASK', 'NAME', 'ATTEMPTS', 'DIED', 'REASON', ''],
      rows.map((d) => h('tr', { 'data-dead': d.id },
        h('td', {}, readOnly ? null : selectBox(d.id, onchange)),
        h('td', { class: 'num' }, d.id),
        h('td', {}, taskLink(d.task_id)),
        h('td', { class: 'name' }, d.task_name ?? '(null)'),
        h('td', { class: 'num' }, d.attempts),
        h('td', {}, ago(d.died_at)),
        h('td', { class: 'err', title: d.reason }, d.headline ?? d.reason),
        h('td', {}, readOnly ? null : h('button', { class: 'requeue', onclick: () => requeue([d.id]) }, 'Requeue')))),
      'No dead letters.');
  }

  function renderDead(doc) {
    const f = doc.filter;
    const form = filterForm('/dead', [
      ['Task name', h('input', { name: 'name', value: f.name || '', placeholder: 'any' })],
      ['Text in args, kwargs or reason', h('input', { name: 'q', value: f.q || '', size: 28 })],
    ]);
    const bulk = h('div', { class: 'bar' });
    const updateBulk = () => {
      const ids = [...selected];
      fill(bulk, 
        readOnly ? null : [
          h('button', { id: 'requeue-selected', disabled: !ids.length, onclick: () => requeue(ids) }, `Requeue selected (${ids.length})`),
          h('button', { id: 'purge-selected', disabled: !ids.length, onclick: () => purge(ids, false) }, `Purge selected (${ids.length})`),
          h('button', { id: 'requeue-matching', onclick: () => matching(requeue) }, 'Requeue all matching…'),
          h('button', { id: 'purge-matching', onclick: () => matching((ids, more) => purge(ids, more)) }, 'Purge all matching…')],
        selected.size ? h('span', { class: 'muted small' }, 'Live updates are paused while rows are selected.') : null);
      if (!frozen()) thaw();
    };
    updateBulk();
    setPage(h('h1', {}, 'Dead letters'), form, countLine(doc.count, 'dead letters match'), bulk,
      deadTable(doc.dead, updateBulk), pager('/dead', doc, 'dead letter'));
  }

  async function matching(then) {
    const query = new URLSearchParams(params);
    query.delete('before');
    try {
      const doc = await getJson('/api/dead/ids?' + query);
      if (!doc.ids.length) {
        openDialog(h('form', { method: 'dialog' }, h('h3', {}, 'No dead letter matches'), h('div', { class: 'actions' }, h('button', {}, 'Close'))));
        return;
      }
      then(doc.ids, doc.more);
    } catch (error) {
      openDialog(h('div', { class: 'notice bad' }, String(error.message)));
    }
  }

  function requeue(ids, more) {
    confirmAction({
      title: `Requeue ${number(ids.length)} dead letter${ids.length === 1 ? '' : 's'}?`,
      lines: [`Exactly these ${number(ids.length)} (dead ${idsText(ids)}) go back to the queue as new tasks, due now; dead letters that arrive after this count are not touched.`,
        more ? 'More than 10,000 match: this takes the oldest 10,000.' : ''],
      button: `Requeue ${number(ids.length)}`,
      cli: 'foreman dead requeue ' + idsText(ids),
      run: () => post('/api/dead/requeue', { ids }),
    });
  }

  function purge(ids, more) {
    const typed = `purge ${ids.length}`;
    confirmAction({
      title: `Delete ${number(ids.length)} dead letter${ids.length === 1 ? '' : 's'} for good?`,
      lines: [`Exactly these ${number(ids.length)} (dead ${idsText(ids)}); their args and kwargs are lost.`,
        more ? 'More than 10,000 match: this takes the oldest 10,000.' : ''],
      button: `Purge ${number(ids.length)}`,
      danger: true,
      typed,
      run: (confirm) => post('/api/dead/purge', { ids, confirm }),
    });
  }

  // ---- errors ----

  async function loadErrors() {
    const win = params.get('window') || '7d';
    const doc = await getJson('/api/errors?window=' + encodeURIComponent(win));
    const seg = h('span', { class: 'seg' }, ['1h', '24h', '7d'].map((w) => h('a', { href: '/errors?window=' + w, class: w === win ? 'on' : '' }, w)));
    const rows = doc.groups.map((g) => h('tr', {},
      h('td', { class: 'err', title: g.example }, g.line),
      h('td', { class: 'num' }, number(g.count)),
      h('td', { class: 'num' }, g.dead ? h('a', { href: '/dead?' + new URLSearchParams({ q: g.line }) }, number(g.dead)) : '0'),
      h('td', {}, ago(g.first_seen)), h('td', {}, ago(g.last_seen)),
      h('td', { class: 'name' }, g.task_names.map((n, i) => [i ? ', ' : '', namesLink(n, { state: 'history' })])),
      h('td', {}, h('a', { href: '/tasks?' + new URLSearchParams({ state: 'history', q: g.line }) }, 'tasks »'))));
    setPage(h('div', { class: 'bar' }, h('h1', { class: 'grow' }, 'Errors, grouped'), seg),
      h('p', { class: 'muted' }, `Failed attempts and dead letters of the last ${win}, grouped by the line that says what went wrong (the last line of a traceback or of stderr), newest first. From the newest ${number(doc.read_limit)} failures at most.`),
      table(['ERROR', 'COUNT', 'DEAD', 'FIRST SEEN', 'LAST SEEN', 'TASK NAMES', ''], rows, 'No failures in this window.'));
  }

  // ---- schedules ----

  async function loadSchedules() {
    const doc = await getJson('/api/schedules');
    if (!changed(doc)) return;
    const rows = doc.schedules.map((s) => h('tr', {},
      h('td', { class: 'name' }, s.name), h('td', { class: 'name' }, s.task ?? h('span', { class: 'muted' }, 'not configured any more')),
      h('td', {}, s.when ?? s.spec ?? ''),
      h('td', {}, until(s.next_due)), h('td', {}, ago(s.last_fired)),
      h('td', {}, s.last_task_id ? [taskLink(s.last_task_id), ' ', state(s.last_task_state)] : ''),
      h('td', {}, s.interval_seconds ? age(s.interval_seconds) : ''),
      h('td', {}, s.configured && !readOnly ? h('button', { class: 'run-now', onclick: () => runNow(s) }, 'Run now') : null)));
    setPage(h('h1', {}, 'Schedules'),
      table(['NAME', 'TASK', 'WHEN', 'NEXT DUE', 'LAST FIRED', 'LAST TASK', 'INTERVAL NOW', ''], rows,
        'No schedules: add [schedules.NAME] to foreman.toml.'));
  }

  function runNow(s) {
    confirmAction({
      title: `Run schedule ${s.name} now?`,
      lines: [`Enqueues ${s.task} once, as the schedule would, with its args; its timetable stays as it is.`],
      button: 'Run now',
      run: () => post('/api/schedules/run', { name: s.name }),
    });
  }

  // ---- daemons ----

  async function loadDaemons() {
    const doc = await getJson('/api/daemons');
    if (!changed(doc)) return;
    header({ health: doc.health, dead: null });
    const d = doc.daemon;
    const facts = h('dl', { class: 'facts' },
      h('dt', {}, 'State'), h('dd', {}, h('span', { class: 'state ' + (d.running ? 'done' : 'failed') }, d.running ? 'up' : 'down'), doc.down_detail ? ' ' + doc.down_detail : ''),
      h('dt', {}, 'Verdict'), h('dd', {}, doc.health.line),
      h('dt', {}, 'Pid / host'), h('dd', {}, `${d.pid ?? '–'} on ${d.host ?? '–'}`),
      h('dt', {}, 'Version'), h('dd', {}, d.version ?? '–'),
      h('dt', {}, 'Started'), h('dd', {}, ago(d.started_at)),
      h('dt', {}, 'Heartbeat'), h('dd', {}, ago(d.heartbeat_at)),
      d.stopping_at ? [h('dt', {}, 'Stopping since'), h('dd', {}, ago(d.stopping_at))] : null,
      d.stopped_at ? [h('dt', {}, 'Stopped'), h('dd', {}, ago(d.stopped_at))] : null,
      h('dt', {}, 'Judged by'), h('dd', {}, d.checked_by === 'lock' ? "the PID file's lock" : 'its heartbeat' + (doc.lock_note ? ` (${doc.lock_note})` : '')),
      h('dt', {}, 'Workers'), h('dd', {}, doc.workers.total != null ? `${doc.workers.busy} busy of ${doc.workers.total}` : '–'));
    const running = table(['WORKER', 'TASK', 'NAME', 'ATTEMPT', 'BUSY SINCE'], doc.running.map((r, i) => h('tr', {},
      h('td', {}, `busy ${i + 1}`), h('td', {}, taskLink(r.task_id)), h('td', { class: 'name' }, r.task_name),
      h('td', { class: 'num' }, r.attempt), h('td', {}, r.started_at ? ago(r.started_at) : '–'))),
      doc.workers.total ? `All ${doc.workers.total} workers are idle.` : 'Nothing is running.');
    const pools = table(['POOL', 'PROCESSES', 'UP', 'BUSY', 'STATE', 'SERVES'], doc.pools.map((p) => h('tr', {},
      h('td', { class: 'name' }, p.name), h('td', { class: 'num' }, p.processes ?? '?'), h('td', { class: 'num' }, p.up ?? '?'),
      h('td', { class: 'num' }, p.busy ?? '?'),
      h('td', {}, p.saturated ? state('saturated') : p.busy ? 'busy' : p.up < p.processes ? 'starting or restarting' : 'idle'),
      h('td', { class: 'name' }, p.tasks.join(', ')))), 'No pools (or the daemon is down).');
    // A shared database (PostgreSQL): every daemon's row; the facts above are this host's.
    const fleet = doc.shared ? [h('h2', {}, 'Every daemon on the database'),
      table(['ID', 'HOST', 'PID', 'STATE', 'HEARTBEAT', 'BUSY', 'SERVES'], doc.daemons.map((x) => h('tr', {},
        h('td', { class: 'num' }, x.id), h('td', { class: 'name' }, x.host), h('td', { class: 'num' }, x.pid),
        h('td', {}, h('span', { class: 'state ' + (x.state === 'up' ? 'done' : x.state === 'stopping' ? 'running' : 'failed') }, x.state)),
        h('td', {}, ago(x.heartbeat_at)), h('td', { class: 'num' }, `${x.workers_busy} / ${x.workers ?? '?'}`),
        h('td', { class: 'name' }, (x.served || []).join(', ')))), 'No daemon has run on this database lately.')] : [];
    setPage(h('h1', {}, 'Daemons and pools'), h('div', { class: 'panel' }, facts), ...fleet,
      h('h2', {}, 'Busy workers'), running, h('h2', {}, 'Pools'), pools);
  }

  // ---- loading, live updates, polling ----

  const loaders = {
    overview: loadOverview, tasks: loadTasks, task: loadTask, dead: loadDead,
    errors: loadErrors, schedules: loadSchedules, daemons: loadDaemons,
  };

  let refreshing = false;
  let again = false;

  async function refresh() {
    if (refreshing) { again = true; return; }
    refreshing = true;
    try {
      await (loaders[page] || (() => failed(new Error('no such page'))))();
    } catch (error) {
      failed(error);
    }
    refreshing = false;
    if (again) { again = false; refresh(); }
  }

  function onOverview(doc) {
    header(doc);
    if (frozen()) { pending = true; return; }
    if (page === 'overview') {
      if (!overviewDoc || doc.now !== overviewDoc.now) {
        if (typeof doc.now === 'number') skew = doc.now - Date.now() / 1000;
        renderOverview(doc);
      }
    } else if (page !== 'errors') {
      throttledRefresh();
    }
  }

  // Other pages read their own endpoint again on a change, at most every 2 s.
  let lastRefresh = 0;
  let refreshTimer = null;

  function throttledRefresh() {
    if (refreshTimer) return;
    const wait = Math.max(0, lastRefresh + 2000 - Date.now());
    refreshTimer = setTimeout(() => {
      refreshTimer = null;
      lastRefresh = Date.now();
      if (frozen()) { pending = true; return; }
      refresh();
    }, wait);
  }

  const live = document.getElementById('live');
  let events = null;
  let failures = 0;
  let poller = null;

  function setLive(on, text) {
    live.className = 'live ' + (on ? 'on' : 'off');
    live.textContent = text;
  }

  function connect() {
    if (events || document.hidden) return;
    events = new EventSource('/api/events');
    events.addEventListener('open', () => { failures = 0; stopPolling(); setLive(true, 'live'); });
    events.addEventListener('overview', (event) => onOverview(JSON.parse(event.data)));
    events.addEventListener('failure', (event) => setLive(false, JSON.parse(event.data).error));
    events.addEventListener('error', () => {
      failures += 1;
      if (failures >= 3) {
        events.close();
        events = null;
        startPolling();
        setTimeout(connect, 30000);
      } else {
        setLive(false, 'reconnecting');
      }
    });
  }

  function disconnect() {
    if (events) { events.close(); events = null; }
    stopPolling();
  }

  function startPolling() {
    if (poller) return;
    setLive(false, 'polling every 5s');
    poller = setInterval(async () => {
      try { onOverview(await getJson('/api/overview')); } catch (error) { setLive(false, 'offline'); }
    }, 5000);
  }

  function stopPolling() {
    if (poller) { clearInterval(poller); poller = null; }
  }

  document.addEventListener('visibilitychange', () => {
    if (document.hidden) {
      disconnect();
      setLive(false, 'paused');
    } else {
      connect();
      refresh();
    }
  });

  refresh().then(() => {
    if (page !== 'overview') getJson('/api/overview').then(header).catch(() => {});
    connect();
  });
})();
