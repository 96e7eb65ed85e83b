#pragma once
// balanced: the partition whose most expensive rank is as cheap as possible, counting the
// vocabulary layers — the input embedding E and the output layer L are items like the
// transformer layers, with their own costs. This is the "redistribute layers" baseline of the
// vocabulary-parallelism paper (Yeung et al., MLSys 2025, "Redis"), solved exactly rather than by
// choosing the last stage's layer count by hand.
//
// Looped placement: min_max_split, the exact dynamic program over prefix sums (the linear
// partition problem): best[k][i], the least possible largest part when the first i items form k
// non-empty contiguous parts, is min over j of max(best[k − 1][j], sum(j..i)). Among the splits
// that reach that minimum a second pass picks the most even one (least sum of squared part
// costs); remaining ties put more items in later parts, which hold fewer microbatches in flight
// under 1F1B. O(parts · items²). With one chunk per rank this minimises the largest rank; with
// v > 1 looped chunks it minimises the largest virtual stage.
//
// V-shaped placement: rank r holds virtual stages r and 2p − 1 − r, so rank 0 holds both ends.
// min_max_v_split minimises the largest *rank* (the sum of its two stages) exactly: a bisection
// on the cap C with an exact feasibility test — walking the ranks from the outside of the V
// inwards, for every left boundary i keep the smallest right boundary j reachable (fewer items
// left is never harder once empty stages are allowed); each rank takes a left stage [i, i') and
// the largest right stage [j', j) that its remaining budget allows. The first and the last stage
// are non-empty (they hold E and L); inner stages may be empty. O(p · items² · log items) per
// test. Among the splits within the optimal cap, a DP over (rank, left boundary, right boundary)
// picks the most even one: least sum of squared rank loads, then of squared stage loads.

#include <algorithm>
#include <cstddef>
#include <limits>
#include <span>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/core/filled.hpp"
#include "pipit/partition/partition.hpp"

namespace pipit::partition {

// Sizes of `parts` non-empty contiguous groups of `weights` minimising the largest group sum
// (then the sum of squared group sums). Throws pipit::error when parts < 1, parts > items or a
// weight is negative or not finite.
constexpr std::vector<int> min_max_split(std::span<const double> weights, int parts) {
  const int n = static_cast<int>(weights.size());
  if (parts < 1) fail("pipit: min_max_split(): parts must be >= 1 (got ", parts, ")");
  if (n < parts)
    fail("pipit: min_max_split(): ", n, " items cannot fill ", parts, " non-empty parts");
  for (int i = 0; i < n; ++i) {
    const double w = weights[static_cast<std::size_t>(i)];
    if (!(w >= 0) || w > std::numeric_limits<double>::max())
      fail("pipit: min_max_split(): weight ", i, " must be finite and >= 0 (got ", w, ")");
  }
  constexpr double inf = std::numeric_limits<double>::infinity();
  const auto nu = static_cast<std::size_t>(n) + 1;
  std::vector<double> prefix = filled(nu, 0.0);
  for (int i = 0; i < n; ++i)
    prefix[static_cast<std::size_t>(i) + 1] =
        prefix[static_cast<std::size_t>(i)] + weights[static_cast<std::size_t>(i)];
  auto sum = [&](int j, int i) {
    return prefix[static_cast<std::size_t>(i)] - prefix[static_cast<std::size_t>(j)];
  };
  auto at = [&](int k, int i) {
    return static_cast<std::size_t>(k) * nu + static_cast<std::size_t>(i);
  };
  const auto cells = static_cast<std::size_t>(parts + 1) * nu;

  // Pass 1: the least possible largest part.
  std::vector<double> best = filled(cells, inf);
  best[at(0, 0)] = 0;
  for (int k = 1; k <= parts; ++k)
    for (int i = k; i <= n - (parts - k); ++i)
      for (int j = k - 1; j < i; ++j) {
        const double prev = best[at(k - 1, j)];
        if (prev == inf) continue;
        const double v = prev > sum(j, i) ? prev : sum(j, i);
        if (v < best[at(k, i)]) best[at(k, i)] = v;
      }
  const double cap = best[at(parts, n)];
  const double total =
      prefix[static_cast<std::size_t>(n)] > 1 ? prefix[static_cast<std::size_t>(n)] : 1.0;
  const double tol = 1e-12 * total, square_tol = 1e-12 * total * total;

  // Pass 2: among splits whose parts all stay within cap, the least sum of squares. Scanning j
  // upwards and replacing only on a strict improvement keeps the smallest j on ties: the last
  // part as large as possible.
  std::vector<double> squares = filled(cells, inf);
  std::vector<int> choice = filled(cells, -1);
  squares[at(0, 0)] = 0;
  for (int k = 1; k <= parts; ++k)
    for (int i = k; i <= n - (parts - k); ++i)
      for (int j = k - 1; j < i; ++j) {
        const double prev = squares[at(k - 1, j)], s = sum(j, i);
        if (prev == inf || s > cap + tol) continue;
        const double v = prev + s * s;
        if (v < squares[at(k, i)] - square_tol) {
          squares[at(k, i)] = v;
          choice[at(k, i)] = j;
        }
      }
  std::vector<int> sizes = filled(static_cast<std::size_t>(parts), 0);
  for (int k = parts, i = n; k > 0; --k) {
    const int j = choice[at(k, i)];
    sizes[static_cast<std::size_t>(k - 1)] = i - j;
    i = j;
  }
  return sizes;
}

namespace impl {

// Whether some V split keeps every rank's load within the cap (see the header comment).
constexpr bool v_split_within(const std::vector<double>& prefix, int ranks, double cap) {
  const int n = static_cast<int>(prefix.size()) - 1;
  const auto nu = static_cast<std::size_t>(n) + 1;
  auto at = [&](int r, int i) {
    return static_cast<std::size_t>(r) * nu + static_cast<std::size_t>(i);
  };
  auto sum = [&](int a, int b) {
    return prefix[static_cast<std::size_t>(b)] - prefix[static_cast<std::size_t>(a)];
  };
  const auto cells = static_cast<std::size_t>(ranks + 1) * nu;
  std::vector<int> right = filled(cells, n + 1);  // n + 1: unreachable
  right[at(0, 0)] = n;
  for (int r = 0; r < ranks; ++r)
    for (int i = 0; i <= n; ++i) {
      const int j = right[at(r, i)];
      if (j > n) continue;
      for (int i2 = (r == 0 ? i + 1 : i); i2 <= j; ++i2) {
        const double rem = cap - sum(i, i2);
        if (rem < 0) break;
        // The smallest j2 in [i2, j] with sum(j2, j) <= rem (prefix is non-decreasing).
        int lo = i2, hi = r == 0 ? j - 1 : j;  // the last stage (rank 0's right) is non-empty
        if (lo > hi || sum(hi, j) > rem) continue;
        while (lo < hi) {
          const int mid = lo + (hi - lo) / 2;
          if (sum(mid, j) <= rem)
            hi = mid;
          else
            lo = mid + 1;
        }
        right[at(r + 1, i2)] = std::min(right[at(r + 1, i2)], lo);
      }
    }
  for (int i = 0; i <= n; ++i)
    if (right[at(ranks, i)] == i) return true;
  return false;
}

}  // namespace impl

// Sizes of the 2·ranks contiguous groups of `weights` (in order) minimising the largest sum of
// the two groups each rank holds under V-shaped placement (groups r and 2·ranks − 1 − r), to a
// relative precision of 1e-12. The first and the last group are non-empty; inner ones may be
// empty. Throws pipit::error when ranks < 1, there are fewer than 2 items or a weight is negative
// or not finite.
constexpr std::vector<int> min_max_v_split(std::span<const double> weights, int ranks) {
  const int n = static_cast<int>(weights.size());
  if (ranks < 1) fail("pipit: min_max_v_split(): ranks must be >= 1 (got ", ranks, ")");
  if (n < 2) fail("pipit: min_max_v_split(): needs at least 2 items (got ", n, ")");
  std::vector<double> prefix = filled(static_cast<std::size_t>(n) + 1, 0.0);
  double largest = 0;
  for (int i = 0; i < n; ++i) {
    const double w = weights[static_cast<std::size_t>(i)];
    if (!(w >= 0) || w > std::numeric_limits<double>::max())
      fail("pipit: min_max_v_split(): weight ", i, " must be finite and >= 0 (got ", w, ")");
    prefix[static_cast<std::size_t>(i) + 1] = prefix[static_cast<std::size_t>(i)] + w;
    largest = std::max(largest, w);
  }
  // The optimum lies in [max(largest item, total / ranks), total].
  double lo = std::max(largest, prefix.back() / ranks), hi = prefix.back();
  const double eps = 1e-12 * (hi > 1 ? hi : 1.0);
  while (hi - lo > eps) {
    const double mid = lo + (hi - lo) / 2;
    if (impl::v_split_within(prefix, ranks, mid))
      hi = mid;
    else
      lo = mid;
  }
  // Among the splits within the cap, the most even: least sum of squared rank loads, then least
  // sum of squared stage loads (a rank's two chunks alike, as the V schedules assume), by a DP
  // over (ranks done, left boundary i, right boundary j).
  const double cap = hi + eps;
  const auto nu = static_cast<std::size_t>(n) + 1;
  auto at = [&](int r, int i, int j) {
    return (static_cast<std::size_t>(r) * nu + static_cast<std::size_t>(i)) * nu +
           static_cast<std::size_t>(j);
  };
  auto sum = [&](int a, int b) {
    return prefix[static_cast<std::size_t>(b)] - prefix[static_cast<std::size_t>(a)];
  };
  constexpr double inf = std::numeric_limits<double>::infinity();
  const auto cells = static_cast<std::size_t>(ranks + 1) * nu * nu;
  std::vector<double> squares = filled(cells, inf);        // rank loads squared
  std::vector<double> stage_squares = filled(cells, inf);  // stage loads squared
  std::vector<int> parent = filled(cells, -1);             // (i * nu + j) of the previous state
  squares[at(0, 0, n)] = 0;
  stage_squares[at(0, 0, n)] = 0;
  const double square_tol = 1e-12 * hi * hi;
  auto better = [&](double a, double a2, double b, double b2) {
    return a < b - square_tol || (a <= b + square_tol && a2 < b2 - square_tol);
  };
  for (int r = 0; r < ranks; ++r)
    for (int i = 0; i <= n; ++i)
      for (int j = i; j <= n; ++j) {
        const double prev = squares[at(r, i, j)], prev2 = stage_squares[at(r, i, j)];
        if (prev == inf) continue;
        for (int i2 = (r == 0 ? i + 1 : i); i2 <= j; ++i2) {
          const double left = sum(i, i2);
          if (left > cap) break;
          for (int j2 = (r == 0 ? j - 1 : j); j2 >= i2; --j2) {
            const double right = sum(j2, j), load = left + right;
            if (load > cap) break;
            const double v = prev + load * load, v2 = prev2 + left * left + right * right;
            const auto k = at(r + 1, i2, j2);
            if (better(v, v2, squares[k], stage_squares[k])) {
              squares[k] = v;
              stage_squares[k] = v2;
              parent[k] = i * static_cast<int>(nu) + j;
            }
          }
        }
      }
  int tip = -1;
  for (int i = 0; i <= n; ++i)
    if (squares[at(ranks, i, i)] != inf &&
        (tip < 0 || better(squares[at(ranks, i, i)], stage_squares[at(ranks, i, i)],
                           squares[at(ranks, tip, tip)], stage_squares[at(ranks, tip, tip)])))
      tip = i;
  if (tip < 0) fail("pipit: min_max_v_split(): internal error: no split within the cap ", cap);
  std::vector<int> left_bound = filled(static_cast<std::size_t>(ranks) + 1, 0);
  std::vector<int> right_bound = filled(static_cast<std::size_t>(ranks) + 1, 0);
  for (int r = ranks, i = tip, j = tip; r >= 0; --r) {
    left_bound[static_cast<std::size_t>(r)] = i;
    right_bound[static_cast<std::size_t>(r)] = j;
    if (r > 0) {
      const int pr = parent[at(r, i, j)];
      i = pr / static_cast<int>(nu);
      j = pr % static_cast<int>(nu);
    }
  }
  std::vector<int> sizes;
  for (int r = 0; r < ranks; ++r)
    sizes.push_back(left_bound[static_cast<std::size_t>(r) + 1] -
                    left_bound[static_cast<std::size_t>(r)]);
  for (int r = ranks - 1; r >= 0; --r)
    sizes.push_back(right_bound[static_cast<std::size_t>(r)] -
                    right_bound[static_cast<std::size_t>(r) + 1]);
  return sizes;
}

// The balanced partition of [E, layer 0, ..., layer L−1, L] with the given per-item costs (any
// unit: seconds of F + B + W per microbatch is what cost::balanced passes).
constexpr partition balanced(std::span<const double> layer_costs, double embedding_cost,
                             double output_cost, const pipeline& pl) {
  check(pl);
  const int layers = static_cast<int>(layer_costs.size());
  const int stages = pl.virtual_stages();
  const bool v = pl.place == schedule::placement::v_shape;
  if (!v && layers + 2 < stages)
    fail("pipit: balanced partition needs at least one item per stage: ", layers,
         " layers + the embedding + the output layer = ", layers + 2, " items < stages (", stages,
         " = ranks ", pl.ranks, " x chunks ", pl.chunks, ")");
  std::vector<double> items;
  items.reserve(static_cast<std::size_t>(layers) + 2);
  items.push_back(embedding_cost);
  for (const double c : layer_costs) items.push_back(c);
  items.push_back(output_cost);
  std::vector<int> sizes;
  if (v)
    sizes = min_max_v_split(items, pl.ranks);
  else
    sizes = min_max_split(items, stages);

  partition p{pl, false, {}};
  int item = 0;  // index into items: 0 is E, 1..layers the layers, layers + 1 is L
  for (int s = 0; s < stages; ++s) {
    stage st{};
    const int end = item + sizes[static_cast<std::size_t>(s)];
    st.embedding = item == 0;
    st.output = end == layers + 2;
    const int first = item == 0 ? 0 : item - 1;             // first layer index in this stage
    const int last = end == layers + 2 ? layers : end - 1;  // one past the last layer
    st.first_layer = first;
    st.layers = last - first;
    p.stages.push_back(st);
    item = end;
  }
  check(p);
  return p;
}

// Every transformer layer costs the same.
constexpr partition balanced(int layers, double embedding_cost, double layer_cost,
                             double output_cost, const pipeline& pl) {
  if (layers < 1) fail("pipit: balanced partition: layers must be >= 1 (got ", layers, ")");
  const std::vector<double> costs = filled(static_cast<std::size_t>(layers), layer_cost);
  return balanced(costs, embedding_cost, output_cost, pl);
}

}  // namespace pipit::partition
