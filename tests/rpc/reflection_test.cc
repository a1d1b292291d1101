// Server reflection on a real server started by rpc::RunningServer, asked by
// real clients: grpc.reflection.v1 (rpc/reflection_service.h, through its
// generated stub) and gRPC's own grpc.reflection.v1alpha (same wire format,
// asked with the v1 messages on the v1alpha method).
#include <google/protobuf/descriptor.h>
#include <google/protobuf/descriptor.pb.h>
#include <google/protobuf/descriptor_database.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "rpc/reflection_service.h"
#include "rpc/server.h"
#include "switchyard/v1/generation.grpc.pb.h"

namespace switchyard::rpc {
namespace {

using grpc::reflection::v1::ServerReflection;
using grpc::reflection::v1::ServerReflectionRequest;
using grpc::reflection::v1::ServerReflectionResponse;
using ::testing::IsSupersetOf;

constexpr char kV1Method[] = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
constexpr char kV1alphaMethod[] = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

ServerReflectionRequest ListServices() {
  ServerReflectionRequest r;
  r.set_host("localhost");
  r.set_list_services("*");
  return r;
}
ServerReflectionRequest Symbol(const std::string& symbol) {
  ServerReflectionRequest r;
  r.set_file_containing_symbol(symbol);
  return r;
}
ServerReflectionRequest File(const std::string& name) {
  ServerReflectionRequest r;
  r.set_file_by_filename(name);
  return r;
}

// The generation service with every method unimplemented: only its name matters.
class GenerationStub final : public v1::GenerationService::CallbackService {};

class ReflectionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    auto server = RunningServer::Start(options, {&generation_});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    channel_ = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
  }

  // Sends `requests` on one stream at `method` and returns the responses;
  // the stream must end OK after the client half-closes.
  std::vector<ServerReflectionResponse> Ask(const char* method,
                                            const std::vector<ServerReflectionRequest>& requests) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    std::unique_ptr<grpc::ClientReaderWriter<ServerReflectionRequest, ServerReflectionResponse>>
        stream;
    if (std::string(method) == kV1Method) {
      stub_ = ServerReflection::NewStub(channel_);
      stream = stub_->ServerReflectionInfo(&context);
    } else {
      // What a generated stub does, on the v1alpha method name.
      stream.reset(
          grpc::internal::
              ClientReaderWriterFactory<ServerReflectionRequest, ServerReflectionResponse>::Create(
                  channel_.get(),
                  grpc::internal::RpcMethod(method, grpc::internal::RpcMethod::BIDI_STREAMING,
                                            channel_),
                  &context));
    }
    std::vector<ServerReflectionResponse> out;
    for (const auto& request : requests) {
      EXPECT_TRUE(stream->Write(request));
      ServerReflectionResponse response;
      EXPECT_TRUE(stream->Read(&response));
      out.push_back(response);
    }
    stream->WritesDone();
    const grpc::Status status = stream->Finish();
    EXPECT_TRUE(status.ok()) << status.error_code() << " " << status.error_message();
    return out;
  }

  std::vector<std::string> Services(const char* method) {
    const auto responses = Ask(method, {ListServices()});
    EXPECT_TRUE(responses[0].has_list_services_response()) << responses[0].DebugString();
    EXPECT_EQ(responses[0].valid_host(), "localhost");
    EXPECT_EQ(responses[0].original_request().list_services(), "*");
    std::vector<std::string> names;
    for (const auto& s : responses[0].list_services_response().service()) {
      names.push_back(s.name());
    }
    return names;
  }

  GenerationStub generation_;
  std::unique_ptr<RunningServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<ServerReflection::Stub> stub_;
};

// The FileDescriptorProtos of a file response, parsed.
std::vector<google::protobuf::FileDescriptorProto> Files(const ServerReflectionResponse& r) {
  std::vector<google::protobuf::FileDescriptorProto> files;
  for (const std::string& bytes : r.file_descriptor_response().file_descriptor_proto()) {
    files.emplace_back();
    EXPECT_TRUE(files.back().ParseFromString(bytes));
  }
  return files;
}

TEST_F(ReflectionTest, ListsTheServersServicesOverV1AndV1alpha) {
  const std::vector<std::string> expected = {
      "switchyard.v1.GenerationService", "grpc.health.v1.Health",
      "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"};
  const std::vector<std::string> v1 = Services(kV1Method);
  EXPECT_THAT(v1, IsSupersetOf(expected));
  EXPECT_EQ(v1.size(), expected.size()) << ::testing::PrintToString(v1);
  const std::vector<std::string> v1alpha = Services(kV1alphaMethod);
  EXPECT_EQ(std::set<std::string>(v1.begin(), v1.end()),
            std::set<std::string>(v1alpha.begin(), v1alpha.end()));
}

TEST_F(ReflectionTest, FileDescriptorsAreCompleteEnoughToCallTheService) {
  const auto responses = Ask(
      kV1Method,
      {Symbol("switchyard.v1.GenerationService"),
       Symbol("switchyard.v1.GenerationService.Generate"), Symbol("switchyard.v1.GenerateRequest"),
       File("switchyard/v1/generation.proto"), File("grpc/reflection/v1/reflection.proto")});
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(responses[i].has_file_descriptor_response()) << i << responses[i].DebugString();
    EXPECT_EQ(Files(responses[i])[0].name(), "switchyard/v1/generation.proto") << i;
  }
  EXPECT_EQ(Files(responses[4])[0].package(), "grpc.reflection.v1");
  EXPECT_EQ(responses[3].original_request().file_by_filename(), "switchyard/v1/generation.proto");

  // The file comes with everything it imports: a fresh pool built from the
  // response alone resolves the service and its message types.
  const auto files = Files(responses[0]);
  std::set<std::string> names;
  google::protobuf::SimpleDescriptorDatabase database;
  for (const auto& f : files) {
    EXPECT_TRUE(names.insert(f.name()).second) << "sent twice: " << f.name();
    ASSERT_TRUE(database.Add(f)) << f.name();
  }
  for (const auto& dependency : files[0].dependency()) {
    EXPECT_TRUE(names.count(dependency)) << "missing import " << dependency;
  }
  google::protobuf::DescriptorPool pool(&database);
  const google::protobuf::ServiceDescriptor* service =
      pool.FindServiceByName("switchyard.v1.GenerationService");
  ASSERT_NE(service, nullptr);
  const google::protobuf::MethodDescriptor* generate = service->FindMethodByName("Generate");
  ASSERT_NE(generate, nullptr);
  EXPECT_EQ(generate->input_type()->full_name(), "switchyard.v1.GenerateRequest");
  EXPECT_EQ(generate->input_type()->field_count(),
            v1::GenerateRequest::descriptor()->field_count());

  // v1alpha (gRPC's implementation) describes the same file the same way.
  const auto alpha = Ask(kV1alphaMethod, {Symbol("switchyard.v1.GenerationService")});
  ASSERT_TRUE(alpha[0].has_file_descriptor_response()) << alpha[0].DebugString();
  EXPECT_EQ(alpha[0].file_descriptor_response().file_descriptor_proto(0),
            responses[0].file_descriptor_response().file_descriptor_proto(0));
}

TEST_F(ReflectionTest, ExtensionQuestions) {
  ServerReflectionRequest numbers;
  numbers.set_all_extension_numbers_of_type("switchyard.v1.GenerateRequest");
  ServerReflectionRequest unknown_type;
  unknown_type.set_all_extension_numbers_of_type("switchyard.v1.NoSuchMessage");
  ServerReflectionRequest extension;
  extension.mutable_file_containing_extension()->set_containing_type(
      "switchyard.v1.GenerateRequest");
  extension.mutable_file_containing_extension()->set_extension_number(1000);
  const auto r = Ask(kV1Method, {numbers, unknown_type, extension});
  ASSERT_TRUE(r[0].has_all_extension_numbers_response()) << r[0].DebugString();
  EXPECT_EQ(r[0].all_extension_numbers_response().base_type_name(),
            "switchyard.v1.GenerateRequest");
  EXPECT_EQ(r[0].all_extension_numbers_response().extension_number_size(), 0);
  EXPECT_EQ(r[1].error_response().error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(r[1].error_response().error_message(),
              ::testing::HasSubstr("switchyard.v1.NoSuchMessage"));
  EXPECT_EQ(r[2].error_response().error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(r[2].error_response().error_message(), ::testing::HasSubstr("extension 1000"));
}

TEST_F(ReflectionTest, UnanswerableQuestionsGetErrorsAndTheStreamGoesOn) {
  const auto r = Ask(kV1Method, {File("no/such.proto"), Symbol("switchyard.v1.Nothing"),
                                 ServerReflectionRequest(), ListServices()});
  EXPECT_EQ(r[0].error_response().error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(r[0].error_response().error_message(), ::testing::HasSubstr("no/such.proto"));
  EXPECT_EQ(r[0].original_request().file_by_filename(), "no/such.proto");
  EXPECT_EQ(r[1].error_response().error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(r[1].error_response().error_message(), ::testing::HasSubstr("switchyard.v1.Nothing"));
  EXPECT_EQ(r[2].error_response().error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_TRUE(r[3].has_list_services_response()) << r[3].DebugString();
}

}  // namespace
}  // namespace switchyard::rpc
