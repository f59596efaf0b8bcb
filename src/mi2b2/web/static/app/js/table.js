// A results table with facets, the paper's "conjunction-or-disjunction queries
// over these facets": AND across columns, OR among the ticked values of one
// column. Each facet value shows how many rows it would add given the other
// columns' filters. Only one page of rows is in the DOM, so ten thousand rows
// stay responsive; filters live in the table object and so survive tab changes.
//
// Column: {key, label, type: "text" | "number" | "bytes" | "date" | "set",
//          facet?: true, value?: row => raw, values?: row => [..] (set columns),
//          render?: row => Node | string, csv?: row => string}

import { bytes, element, isoDay, when } from "./api.js";

const MB = 1e6;

export class FacetTable {
  constructor({ name, columns, key, selectable = true, pageSize = 100, expand = null, onSelect = null,
    empty = "nothing to show" }) {
    this.name = name;
    this.columns = columns;
    this.key = key;
    this.selectable = selectable;
    this.pageSize = pageSize;
    this.expand = expand;
    this.onSelect = onSelect || (() => {});
    this.empty = empty;
    this.rows = [];
    this.byKey = new Map();
    this.selected = new Set();
    this.expanded = new Map(); // row key -> detail node, kept across re-renders
    this.filters = {};         // column key -> {values: Set} | {min, max} | {text}
    this.sort = null;          // {key, descending}
    this.page = 0;
    this.facetNodes = new Map();
    this.element = this.build();
  }

  // --- data ---------------------------------------------------------------------------------

  setRows(rows) {
    this.rows = [];
    this.byKey.clear();
    this.appendRows(rows);
  }

  /** Add rows; a row whose key is already here replaces the old one in place. */
  appendRows(rows) {
    for (const row of rows) {
      const key = this.key(row);
      if (this.byKey.has(key)) this.rows[this.rows.indexOf(this.byKey.get(key))] = row;
      else this.rows.push(row);
      this.byKey.set(key, row);
    }
    for (const key of [...this.selected]) if (!this.byKey.has(key)) this.selected.delete(key);
    this.refresh();
  }

  selectedRows() {
    return this.rows.filter((row) => this.selected.has(this.key(row)));
  }

  clearSelection() {
    this.selected.clear();
    this.refresh();
  }

  select(keys) {
    for (const key of keys) if (this.byKey.has(key)) this.selected.add(key);
    this.refresh();
  }

  filteredRows() {
    const failing = this.failingCounts();
    return this.rows.filter((_, index) => failing[index] === 0);
  }

  // --- filtering ----------------------------------------------------------------------------

  raw(column, row) {
    return column.value ? column.value(row) : row[column.key];
  }

  valuesOf(column, row) {
    if (column.values) return column.values(row);
    const value = this.raw(column, row);
    return [value === null || value === undefined || value === "" ? "(none)" : String(value)];
  }

  passes(column, row) {
    const filter = this.filters[column.key];
    if (!filter) return true;
    if (column.type === "set") {
      if (!filter.values.size) return true;
      return this.valuesOf(column, row).some((v) => filter.values.has(v));
    }
    if (column.type === "text") {
      const wanted = (filter.text || "").trim().toLowerCase();
      return !wanted || String(this.raw(column, row) ?? "").toLowerCase().includes(wanted);
    }
    const value = this.comparable(column, this.raw(column, row));
    if (filter.min !== "" && filter.min !== undefined && (value === null || value < filter.min)) return false;
    if (filter.max !== "" && filter.max !== undefined && (value === null || value > filter.max)) return false;
    return true;
  }

  comparable(column, value) {
    if (value === null || value === undefined || value === "") return null;
    if (column.type === "date") return isoDay(value) || null;
    if (column.type === "bytes") return Number(value) / MB;
    return Number(value);
  }

  /** For each row, how many columns' filters it fails: 0 = shown; 1 = counts for that one facet. */
  failingCounts() {
    const active = this.columns.filter((c) => this.filters[c.key]);
    this.failingColumn = new Array(this.rows.length).fill(null);
    return this.rows.map((row, index) => {
      let failing = 0;
      for (const column of active) {
        if (!this.passes(column, row)) {
          failing += 1;
          this.failingColumn[index] = column.key;
        }
      }
      return failing;
    });
  }

  setFilter(columnKey, filter) {
    this.filters[columnKey] = filter;
    this.page = 0;
    this.refresh();
  }

  clearFilters() {
    this.filters = {};
    this.page = 0;
    this.facetNodes.clear();
    this.facets.replaceChildren();
    this.refresh();
  }

  // --- building and drawing -----------------------------------------------------------------

  build() {
    this.facets = element("div", { class: "facets", role: "group", "aria-label": "filters" });
    this.summary = element("span", { class: "table-summary", role: "status" });
    this.pager = element("span", { class: "pager" });
    this.head = element("thead");
    this.body = element("tbody");
    this.table = element("table", { class: "grid" }, this.head, this.body);
    const clear = element("button", { type: "button", class: "link", text: "clear filters",
      onclick: () => this.clearFilters() });
    const facetPanel = element("aside", { class: "facet-panel" },
      element("div", { class: "facet-title" }, element("strong", { text: "Filters" }), clear), this.facets);
    const main = element("div", { class: "table-main" },
      element("div", { class: "table-bar" }, this.summary, this.pager),
      element("div", { class: "table-scroll" }, this.table));
    this.drawHead();
    return element("div", { class: "facet-table", "data-table": this.name }, facetPanel, main);
  }

  drawHead() {
    const cells = [];
    if (this.expand) cells.push(element("th", { class: "narrow", "aria-label": "details" }));
    if (this.selectable) {
      this.allBox = element("input", { type: "checkbox", "aria-label": "select all filtered rows",
        onchange: (event) => this.selectAll(event.target.checked) });
      cells.push(element("th", { class: "narrow" }, this.allBox));
    }
    for (const column of this.columns) {
      const button = element("button", { type: "button", class: "sort", text: column.label,
        onclick: () => this.sortBy(column.key) });
      const th = element("th", { "data-key": column.key, class: column.type === "number" || column.type === "bytes" ? "num" : "" }, button);
      cells.push(th);
    }
    this.head.replaceChildren(element("tr", {}, ...cells));
  }

  sortBy(key) {
    this.sort = this.sort && this.sort.key === key ? { key, descending: !this.sort.descending } : { key, descending: false };
    for (const th of this.head.querySelectorAll("th[data-key]")) {
      th.setAttribute("aria-sort", th.dataset.key === key ? (this.sort.descending ? "descending" : "ascending") : "none");
    }
    this.refresh();
  }

  sorted(rows) {
    if (!this.sort) return rows;
    const column = this.columns.find((c) => c.key === this.sort.key);
    const direction = this.sort.descending ? -1 : 1;
    const value = (row) => {
      const v = column.type === "text" || column.type === "set" ? this.raw(column, row) : this.comparable(column, this.raw(column, row));
      return v === null || v === undefined ? "" : v;
    };
    return [...rows].sort((a, b) => {
      const x = value(a);
      const y = value(b);
      if (typeof x === "number" && typeof y === "number") return (x - y) * direction;
      return String(x).localeCompare(String(y), undefined, { numeric: true }) * direction;
    });
  }

  selectAll(checked) {
    for (const row of this.filteredRows()) {
      const key = this.key(row);
      if (checked) this.selected.add(key);
      else this.selected.delete(key);
    }
    this.refresh();
  }

  refresh() {
    const focus = this.focusMark();
    const failing = this.failingCounts();
    const shown = this.sorted(this.rows.filter((_, index) => failing[index] === 0));
    this.drawFacets(failing);
    const pages = Math.max(1, Math.ceil(shown.length / this.pageSize));
    this.page = Math.min(this.page, pages - 1);
    const first = this.page * this.pageSize;
    this.drawRows(shown.slice(first, first + this.pageSize));
    const selectedShown = shown.filter((row) => this.selected.has(this.key(row))).length;
    this.summary.textContent = `${shown.length} of ${this.rows.length} rows`
      + (this.selected.size ? ` · ${this.selected.size} selected` : "")
      + (shown.length > this.pageSize ? ` · showing ${first + 1}–${Math.min(first + this.pageSize, shown.length)}` : "");
    if (this.allBox) {
      this.allBox.checked = shown.length > 0 && selectedShown === shown.length;
      this.allBox.indeterminate = selectedShown > 0 && selectedShown < shown.length;
    }
    this.drawPager(pages);
    this.restoreFocus(focus);
    this.onSelect(this.selectedRows());
  }

  /** Which redrawn control has the keyboard focus, so that a redraw does not throw it to the top. */
  focusMark() {
    const active = document.activeElement;
    if (!active || !this.element || !this.element.contains(active)) return null;
    // A control inside an expanded row's details is the same node after the redraw, only moved.
    if (active.closest("tr.detail")) return { node: active };
    const row = active.closest("tr[data-key]");
    if (row && this.body.contains(row)) return { key: row.dataset.key, control: active.classList.contains("disclose") ? "button.disclose" : "input[type=checkbox]" };
    if (this.pager.contains(active)) return { pager: active.dataset.pager };
    return null;
  }

  restoreFocus(mark) {
    if (!mark) return;
    let target = null;
    if (mark.node) {
      target = mark.node.isConnected ? mark.node : null;
    } else if (mark.pager) {
      target = this.pager.querySelector(`[data-pager="${mark.pager}"]:not(:disabled)`) || this.pager.querySelector("button:not(:disabled)");
    } else {
      const row = [...this.body.querySelectorAll("tr[data-key]")].find((r) => r.dataset.key === mark.key);
      target = row ? row.querySelector(mark.control) : null;
    }
    if (target && document.activeElement !== target) target.focus();
  }

  drawPager(pages) {
    if (pages <= 1) { this.pager.replaceChildren(); return; }
    const go = (page) => { this.page = page; this.refresh(); };
    this.pager.replaceChildren(
      element("button", { type: "button", text: "‹ previous", "data-pager": "previous", disabled: this.page === 0,
        onclick: () => go(this.page - 1) }),
      element("span", { text: ` page ${this.page + 1} of ${pages} ` }),
      element("button", { type: "button", text: "next ›", "data-pager": "next", disabled: this.page >= pages - 1,
        onclick: () => go(this.page + 1) }),
    );
  }

  drawRows(rows) {
    const width = this.columns.length + (this.selectable ? 1 : 0) + (this.expand ? 1 : 0);
    if (!rows.length) {
      this.body.replaceChildren(element("tr", {}, element("td", { colspan: width, class: "muted", text: this.rows.length ? "no rows match the filters" : this.empty })));
      return;
    }
    const lines = [];
    for (const row of rows) {
      const key = this.key(row);
      const cells = [];
      if (this.expand) {
        const open = this.expanded.has(key);
        cells.push(element("td", { class: "narrow" }, element("button", {
          type: "button", class: "disclose", text: open ? "▾" : "▸", "aria-expanded": String(open),
          "aria-label": open ? "hide details" : "show details", onclick: () => this.toggle(row),
        })));
      }
      if (this.selectable) {
        cells.push(element("td", { class: "narrow" }, element("input", {
          type: "checkbox", checked: this.selected.has(key), "aria-label": "select row",
          onchange: (event) => { if (event.target.checked) this.selected.add(key); else this.selected.delete(key); this.refresh(); },
        })));
      }
      for (const column of this.columns) cells.push(this.cell(column, row));
      lines.push(element("tr", { "data-key": key, class: this.selected.has(key) ? "selected" : "" }, ...cells));
      if (this.expanded.has(key)) lines.push(element("tr", { class: "detail" }, element("td", { colspan: width }, this.expanded.get(key))));
    }
    this.body.replaceChildren(...lines);
  }

  cell(column, row) {
    const numeric = column.type === "number" || column.type === "bytes";
    const td = element("td", { class: numeric ? "num" : "", "data-col": column.key });
    if (column.render) {
      const shown = column.render(row);
      td.append(shown === null || shown === undefined ? "" : shown);
    } else {
      const value = this.raw(column, row);
      td.textContent = column.type === "bytes" ? bytes(value) : column.type === "date" ? when(value) : (value ?? "");
    }
    return td;
  }

  async toggle(row) {
    const key = this.key(row);
    if (this.expanded.has(key)) {
      this.expanded.delete(key);
      this.refresh();
      return;
    }
    const holder = element("div", { class: "muted", text: "loading…" });
    this.expanded.set(key, holder);
    this.refresh();
    try {
      holder.replaceChildren(await this.expand(row));
      holder.className = "";
    } catch (error) {
      holder.textContent = error.message;
      holder.className = "error";
    }
  }

  // --- facets ---------------------------------------------------------------------------------

  drawFacets(failing) {
    for (const column of this.columns.filter((c) => c.facet)) {
      let node = this.facetNodes.get(column.key);
      if (!node) {
        node = column.type === "set" ? this.setFacet(column) : column.type === "text" ? this.textFacet(column) : this.rangeFacet(column);
        this.facetNodes.set(column.key, node);
        this.facets.append(node.element);
      }
      if (column.type === "set") this.countSetFacet(column, node, failing);
    }
  }

  textFacet(column) {
    const input = element("input", { type: "search", "aria-label": `${column.label} contains`, placeholder: "contains…",
      value: this.filters[column.key]?.text || "",
      oninput: (event) => this.setFilter(column.key, { text: event.target.value }) });
    return { element: element("fieldset", { class: "facet", "data-facet": column.key }, element("legend", { text: column.label }), input) };
  }

  rangeFacet(column) {
    const type = column.type === "date" ? "date" : "number";
    const unit = column.type === "bytes" ? " (MB)" : "";
    const current = this.filters[column.key] || { min: "", max: "" };
    const read = (input) => (input.value === "" ? "" : type === "date" ? input.value : Number(input.value));
    const low = element("input", { type, step: "any", "aria-label": `${column.label} from`, "data-bound": "min", value: current.min ?? "" });
    const high = element("input", { type, step: "any", "aria-label": `${column.label} to`, "data-bound": "max", value: current.max ?? "" });
    const changed = () => this.setFilter(column.key, { min: read(low), max: read(high) });
    low.addEventListener("input", changed);
    high.addEventListener("input", changed);
    return {
      element: element("fieldset", { class: "facet range", "data-facet": column.key },
        element("legend", { text: column.label + unit }),
        element("label", {}, "from ", low), element("label", {}, "to ", high)),
    };
  }

  setFacet(column) {
    const list = element("div", { class: "facet-values" });
    return { element: element("fieldset", { class: "facet", "data-facet": column.key }, element("legend", { text: column.label }), list), list, values: null };
  }

  countSetFacet(column, node, failing) {
    const counts = new Map();
    this.rows.forEach((row, index) => {
      const counted = failing[index] === 0 || (failing[index] === 1 && this.failingColumn[index] === column.key);
      for (const value of new Set(this.valuesOf(column, row))) {
        if (!counts.has(value)) counts.set(value, 0);
        if (counted) counts.set(value, counts.get(value) + 1);
      }
    });
    const ticked = this.filters[column.key]?.values || new Set();
    // A ticked value whose rows are gone still filters: keep its box, so it can be unticked.
    for (const value of ticked) if (!counts.has(value)) counts.set(value, 0);
    const values = [...counts.keys()].sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
    if (node.values !== values.join("\u0000")) {
      node.values = values.join("\u0000");
      node.boxes = new Map();
      node.list.replaceChildren(...values.map((value) => {
        const box = element("input", { type: "checkbox", value, checked: ticked.has(value),
          onchange: () => this.setFilter(column.key, { values: new Set([...node.boxes].filter(([, b]) => b.box.checked).map(([v]) => v)) }) });
        const count = element("span", { class: "count" });
        node.boxes.set(value, { box, count });
        return element("label", { class: "facet-value" }, box, ` ${value} `, count);
      }));
    }
    for (const [value, { count }] of node.boxes) count.textContent = `(${counts.get(value) || 0})`;
  }
}
