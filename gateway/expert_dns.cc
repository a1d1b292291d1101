#include "gateway/expert_dns.h"

#include <algorithm>
#include <cstdio>
#include <set>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/host_port.h"

namespace switchyard {
namespace {

constexpr char kDnsPrefix[] = "dns:///";

// NAME and PORT of an expandable target.
absl::StatusOr<HostPort> SplitDnsTarget(const std::string& target) {
  if (!absl::StartsWith(target, kDnsPrefix)) return absl::InvalidArgumentError("not dns:///");
  absl::StatusOr<HostPort> split = SplitHostPort(target.substr(sizeof(kDnsPrefix) - 1));
  if (split.ok() && split->host.empty()) return absl::InvalidArgumentError("no name");
  return split;
}

}  // namespace

bool IsExpandableDnsTarget(const std::string& target) { return SplitDnsTarget(target).ok(); }

ExpertTargetResolver SystemExpertTargetResolver() {
  return [](const std::string& host, int port) -> absl::StatusOr<std::vector<std::string>> {
    absl::StatusOr<std::vector<TcpAddress>> found = ResolveTcp(host, port);
    if (!found.ok()) return found.status();
    std::vector<std::string> out;
    for (const TcpAddress& a : *found) out.push_back(a.ToString());
    return out;
  };
}

DnsExpansion ExpandDnsTargets(const ExpertTopology& configured, const ExpertTargetResolver& resolve,
                              const std::map<std::string, std::vector<std::string>>& last) {
  DnsExpansion out;
  out.topology.tls_names = configured.tls_names;
  std::set<std::string> resolved;  // each name resolved once per expansion
  for (const auto& [expert, targets] : configured.replicas) {
    std::vector<std::string>& expanded = out.topology.replicas[expert];
    auto add = [&expanded](const std::string& t) {
      if (std::find(expanded.begin(), expanded.end(), t) == expanded.end()) expanded.push_back(t);
    };
    for (const std::string& target : targets) {
      absl::StatusOr<HostPort> name = SplitDnsTarget(target);
      if (!name.ok()) {
        add(target);
        continue;
      }
      if (resolved.insert(target).second) {
        absl::StatusOr<std::vector<std::string>> addresses = resolve(name->host, name->port);
        if (addresses.ok() && addresses->empty()) {
          addresses = absl::UnavailableError("no address");
        }
        if (addresses.ok()) {
          std::sort(addresses->begin(), addresses->end());
          out.addresses[target] = *std::move(addresses);
        } else if (auto it = last.find(target); it != last.end()) {
          out.addresses[target] = it->second;
          out.problems.push_back(absl::StrCat(target, ": ", addresses.status().message(),
                                              " (keeping its ", it->second.size(), " addresses)"));
        } else {
          out.problems.push_back(
              absl::StrCat(target, ": ", addresses.status().message(), " (left to gRPC)"));
        }
      }
      if (auto it = out.addresses.find(target); it != out.addresses.end()) {
        for (const std::string& a : it->second) {
          add(a);
          // Its certificate names the Service (the first, if two share it).
          out.topology.tls_names.try_emplace(a, name->host);
        }
      } else {
        add(target);
      }
    }
  }
  return out;
}

ExpertDnsRefresher::ExpertDnsRefresher(ExpertTopology configured, DnsExpansion applied,
                                       RemoteExpertBackend* backend, int refresh_ms,
                                       ExpertTargetResolver resolve,
                                       std::function<void(const ExpertTopology&)> on_applied)
    : backend_(backend),
      resolve_(std::move(resolve)),
      on_applied_(std::move(on_applied)),
      configured_(std::move(configured)),
      served_(std::move(applied)) {
  last_problems_ = absl::StrJoin(served_.problems, "; ");
  thread_ = std::make_unique<PeriodicThread>(refresh_ms, [this] { RefreshOnce(); });
}

absl::StatusOr<std::string> ExpertDnsRefresher::SetConfigured(const ExpertTopology& configured) {
  std::lock_guard<std::mutex> lock(mu_);
  configured_ = configured;
  return ApplyLocked();
}

bool ExpertDnsRefresher::RefreshOnce() {
  std::lock_guard<std::mutex> lock(mu_);
  absl::StatusOr<std::string> changed = ApplyLocked();
  return changed.ok() && !changed->empty();
}

absl::StatusOr<std::string> ExpertDnsRefresher::ApplyLocked() {
  DnsExpansion next = ExpandDnsTargets(configured_, resolve_, served_.addresses);
  // Name problems are logged when they change, not every period.
  if (std::string problems = absl::StrJoin(next.problems, "; "); problems != last_problems_) {
    if (!problems.empty()) {
      std::fprintf(stderr, "switchyard-gateway: expert DNS: %s\n", problems.c_str());
    }
    last_problems_ = std::move(problems);
  }
  if (next.topology.replicas == served_.topology.replicas) {
    served_.addresses = std::move(next.addresses);
    return std::string();
  }
  absl::StatusOr<std::string> changed = backend_->ApplyTopology(next.topology);
  if (!changed.ok()) {
    // A pod that appeared but does not answer yet, say: the next refresh tries again.
    refused_.fetch_add(1);
    std::fprintf(stderr,
                 "switchyard-gateway: expert DNS answers changed but the new replicas are "
                 "refused, keeping the current ones: %s\n",
                 changed.status().ToString().c_str());
    return changed.status();
  }
  served_ = std::move(next);
  if (!changed->empty()) {
    applied_.fetch_add(1);
    std::fprintf(stderr, "switchyard-gateway: expert DNS applied: %s\n", changed->c_str());
    if (on_applied_) on_applied_(backend_->topology());
  }
  return changed;
}

}  // namespace switchyard
