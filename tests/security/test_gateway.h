// A gateway on tiny-mixtral for the security tests: a free port on
// 127.0.0.1, a small KV cache, `options` otherwise as given.
#ifndef SWITCHYARD_TESTS_SECURITY_TEST_GATEWAY_H_
#define SWITCHYARD_TESTS_SECURITY_TEST_GATEWAY_H_

#include <memory>

#include "gateway/gateway_server.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace switchyard::testing {

// Null (with a test failure naming why) when it does not start.
inline std::unique_ptr<Gateway> StartGateway(GatewayOptions options) {
  options.model_dir = TinyMixtralDir();
  options.listen = "127.0.0.1:0";
  options.kv_cache_tokens = 4096;
  auto gateway = Gateway::Start(options);
  EXPECT_TRUE(gateway.ok()) << gateway.status();
  return gateway.ok() ? *std::move(gateway) : nullptr;
}

}  // namespace switchyard::testing

#endif  // SWITCHYARD_TESTS_SECURITY_TEST_GATEWAY_H_
